"""Shared helpers of the benchmark scripts: machine description, timing, memory, tables, module loading.

Not a benchmark itself; the scripts next to it import it (`python benchmarks/<script>.py` puts this folder on
sys.path). The repository root is added to sys.path here so that the scripts can import drama_xs and its variants.
"""

import argparse
import contextlib
import importlib
import math
import os
import platform
import statistics
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def add_common_args(parser: argparse.ArgumentParser, timing: bool = True) -> None:
    """The flags every benchmark takes; `timing` adds --bf16, --warmup and --repeats (scripts that use them)."""
    parser.add_argument("--quick", action="store_true", help="smaller sweep and fewer repeats (< 10 min on 2 cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    if timing:
        parser.add_argument("--bf16", action="store_true", help="run the models under bf16 autocast")
        parser.add_argument("--warmup", type=int, default=None, help="untimed iterations before timing")
        parser.add_argument("--repeats", type=int, default=None, help="timed iterations; the median is reported")


def setup(args: argparse.Namespace) -> torch.device:
    """Threads, seed and device from the common flags; fails with one line when CUDA is asked for but absent."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda was asked for but CUDA is not available: use --device cpu")
    return torch.device(args.device)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` (CPU or CUDA) when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device, bf16: bool = False) -> str:
    """One block of text that says what the numbers below were measured on."""
    preload = os.environ.get("LD_PRELOAD", "")
    flags = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "-"
    lines = [
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs; ISA: {isa})",
        f"- torch {torch.__version__}, python {platform.python_version()}, torch threads {torch.get_num_threads()}",
        f"- tcmalloc preloaded: {'yes' if 'tcmalloc' in preload else 'no'} (LD_PRELOAD={preload or '-'})",
        f"- device: {device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"- precision: {'bf16 autocast' if bf16 else 'fp32'}",
    ]
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
        busy = " (above 0.5: recent or current load from other processes, timings may be noisy)" if load > 0.5 else ""
        lines.append(f"- load average at start (1 min): {load:.2f}{busy}")
    return "\n".join(lines)


def load_average() -> float:
    """The 1-minute load average (0 where /proc/loadavg is missing): how busy a shared machine was."""
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        return float(f.read().split()[0])
    return 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Run fn `warmup` times untimed, then `repeats` times; wall-clock seconds of each timed run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure_interleaved(
    fns: dict, device: torch.device, warmup: int, repeats: int, alternate: bool = False
) -> dict[str, list[float]]:
    """Like `measure` for several functions, timed round-robin (one run of each per repeat), so that a load spike
    on a shared machine hits all of them alike instead of one function's whole block of repeats. With `alternate`,
    every other round runs them in reverse order (a drift within a round then favours none of them)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns)[::-1] if alternate and r % 2 else fns:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values) -> float:
    return statistics.median(values)


class SavedTensorBytes:
    """Bytes autograd keeps for the backward pass (context manager), counted by `saved_tensors_hooks`.

    Every tensor saved for backward is seen once when packed; storages are deduplicated by address, and the
    module parameters (passed as `exclude`) are not counted. This is the activation memory of training, the part
    that grows with batch and sequence length; it works on CPU (where torch has no peak-memory counter) and CUDA.
    """

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor):
        with contextlib.suppress(RuntimeError, NotImplementedError):  # tensors without storage are not counted
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self.exclude and key not in self.seen:
                self.seen.add(key)
                self.bytes += storage.nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def format_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats are printed with 3 significant digits, None as '-'."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if value == 0 or not math.isfinite(value):
                return f"{value:g}"
            digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
            return f"{value:,.{digits}f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row, values in zip(cells, rows, strict=True):
        justified = [
            c.rjust(w) if isinstance(v, int | float) else c.ljust(w)
            for c, w, v in zip(row, widths, values, strict=True)
        ]
        lines.append("| " + " | ".join(justified) + " |")
    return "\n".join(lines)


def fit_exponent(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x): y ~ x^slope."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def load_variant(name: str):
    """Import a script of the repository by module name (e.g. drama_xs, drama_s); None if it does not exist."""
    if not os.path.exists(os.path.join(REPO_ROOT, f"{name}.py")):
        return None
    return importlib.import_module(name)


def mamba_stacks(d_model: int, n_layers: int) -> tuple[dict[str, "ResidualStack"], list[str]]:
    """{"Mamba-2": ..., "Mamba-1": ...} stacks with the paper's mixer settings, and notes (a missing Mamba-1)."""
    drama_xs, drama_mamba1 = load_variant("drama_xs"), load_variant("drama_mamba1")
    models = {"Mamba-2": ResidualStack(lambda: drama_xs.Mamba2(d_model, 16, 4, 2, 128, 64), d_model, n_layers)}
    if drama_mamba1 is None:
        return models, ["Mamba-1 row skipped: drama_mamba1.py is missing"]
    models["Mamba-1"] = ResidualStack(lambda: drama_mamba1.Mamba1(d_model, 16, 4, 2), d_model, n_layers)
    return models, ["Mamba-1 mixer from drama_mamba1.py"]


class ResidualStack(torch.nn.Module):
    """n pre-norm residual blocks x + mixer(RMSNorm(x)), then RMSNorm: the layout of drama_xs.Dynamics.

    `make_mixer()` builds a mixer with the Mamba API: forward(x, state=None) -> (y, state), forward_token(x, state) ->
    (y, state), allocate_state(batch, device, dtype).
    """

    def __init__(self, make_mixer, d_model: int, n_layers: int):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(d_model, eps=1e-5) for _ in range(n_layers))
        self.mixers = torch.nn.ModuleList(make_mixer() for _ in range(n_layers))
        self.norm = torch.nn.RMSNorm(d_model, eps=1e-5)

    def forward(self, x: torch.Tensor):
        """x (B, L, D) -> y (B, L, D), the states after the last token (one per block)."""
        new_states = []
        for norm, mixer in zip(self.norms, self.mixers, strict=True):
            y, state = mixer(norm(x))
            x = x + y
            new_states.append(state)
        return self.norm(x), new_states

    def forward_token(self, x: torch.Tensor, states):
        """x (B, D) -> y (B, D), new states."""
        new_states = []
        for norm, mixer, state in zip(self.norms, self.mixers, states, strict=True):
            y, state = mixer.forward_token(norm(x), state)
            x = x + y
            new_states.append(state)
        return self.norm(x), new_states

    def allocate_state(self, batch: int, device=None, dtype=None):
        return [mixer.allocate_state(batch, device, dtype) for mixer in self.mixers]
