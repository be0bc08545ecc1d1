"""--precision: which float format the scripts train in, and why (`precision_of`).

The rule of `auto`: bf16 autocast on CUDA; on a CPU, bf16 where the processor has bf16 instructions, fp32 otherwise.
The CPU's instructions are read from `torch.cpu.get_capabilities()` (cpuinfo, the library PyTorch's own kernels
dispatch on), else (older torch) from the flags of /proc/cpuinfo: x86 `avx512_bf16` (AMD Zen 4+, Intel Cooper
Lake+) or `amx_bf16` (Intel Sapphire Rapids+), Arm `bf16` / `sve_bf16`. Not used, because they cannot tell native
bf16 from emulated: `torch.backends.cpu.get_cpu_capability()` says "AVX512" on every AVX-512 CPU, and
`torch.ops.mkldnn._is_mkldnn_bf16_supported()` is true on every AVX-512 CPU (oneDNN emulates bf16 there, slower
than fp32). No timed probe either: it would cost start-up time, and on a shared machine its answer could change
from run to run, so two runs of the same command could train differently.
"""

import contextlib
import warnings

import torch

from utils import UserError

# the capability names that mean native bf16 arithmetic, in the order they are reported
NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "sve_bf16", "bf16")


def cpu_capabilities(cpuinfo: str = "/proc/cpuinfo") -> dict[str, object]:
    """The CPU's features as PyTorch sees them, or the flags of `cpuinfo` where this torch cannot say."""
    if hasattr(torch.cpu, "get_capabilities"):
        return dict(torch.cpu.get_capabilities())
    flags = set()
    with contextlib.suppress(OSError), open(cpuinfo) as f:
        for line in f:
            if line.startswith(("flags", "Features")):  # x86 / Arm
                flags |= set(line.split(":", 1)[1].split())
    return {flag: True for flag in flags}


def native_bf16(capabilities: dict[str, object]) -> list[str]:
    """The names in `capabilities` that mean the CPU computes in bf16 natively (empty: emulated, slow)."""
    return [name for name in NATIVE_BF16 if capabilities.get(name)]


def precision_of(name: str, device: torch.device, capabilities: dict[str, object] | None = None) -> tuple[str, str]:
    """--precision {auto, fp32, bf16} on `device` -> ("fp32" or "bf16", why), e.g. ("bf16", "cpu has avx512_bf16")."""
    if name not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision {name} is not one of auto, fp32, bf16: pick one of them")
    if name != "auto":
        return name, "asked for with --precision"
    if device.type == "cuda":
        return "bf16", "auto on CUDA"
    features = native_bf16(cpu_capabilities() if capabilities is None else capabilities)
    if features:
        return "bf16", f"cpu has {' + '.join(features)}"
    return "fp32", "cpu has no native bf16 (no avx512_bf16, amx_bf16 or Arm bf16): emulated bf16 is slower"


def autocast(device: torch.device, precision: str):
    """bf16 autocast on `device` when `precision` is bf16, else a context that changes nothing.

    Under CPU autocast, RMSNorm gets bf16 inputs and its fp32 weight and takes torch's unfused path, with a
    UserWarning that says so at the first call; that path is correct (and measured faster overall), so the
    warning is silenced.
    """
    if precision == "bf16":
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
