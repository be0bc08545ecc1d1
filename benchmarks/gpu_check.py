"""The GPU check: one command on one CUDA GPU without network, at most 8 minutes on an H100, Triton compiles included.

    PYTHONPATH=/path/to/bundle python benchmarks/gpu_check.py OUT_DIR           # the bundle: benchmarks/gpu_bundle.py
    python benchmarks/gpu_check.py OUT_DIR --device cpu                          # a dry run at tiny sizes (a test)

The node needs a CUDA build of torch, Triton and a C compiler; everything else comes from the bundle folder
(gpu_bundle.py builds it on a machine with network). Steps, each a subprocess with its own time limit; a step that
fails or runs out of time does not stop the later ones:
  0. what runs here: GPU, driver, torch and its CUDA, Triton, the C compiler, the Mamba scan. On CUDA the check stops
     here, with one line, unless the scan is mamba_ssm's fused one (there is nothing to measure otherwise).
  1. the GPU tests: tests/test_cuda.py, test_gpu_path.py, test_mamba1.py (passed / failed / skipped).
  2. one update at the paper's batch, eager, then 3. with --compile (benchmarks/training_step.py, --precision auto):
     seconds per update and the peak GPU memory.
  4. drama_xs.py on ALE/Krull-v5 at the paper's settings with 8,000 random steps first, so that the seconds per
     training step (an update, an action, an env step) are measured with at least 8,000 steps in the buffer, until
     its time limit: the projected hours of a 100k-step run at train ratio 1 (the paper's 1,032 random steps at the
     measured random-step speed) and the GPU's peak memory use (nvidia-smi).
OUT_DIR receives every step's log and summary.json; Triton's and Inductor's caches go where the scripts put them
(utils/compile_cache.py: ~/.cache/drama unless TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR say otherwise), so the steps
after the first compile reuse the kernels, and a second check on the same node compiles nothing.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree

import _common as C

from utils.compile_cache import compile_cache_folders

TOTAL_TIMESTEPS = 100_000  # the projected run (Atari100k)
PAPER_RANDOM_STEPS = 1032
BUFFER_STEPS = 8000  # random steps before training: the buffer the training step is measured with
# seconds per step on CUDA (8 minutes in all); the dry run's are below
LIMITS = {"info": 45, "tests": 120, "update_eager": 75, "update_compiled": 90, "train": 150}
DRY_LIMITS = {"info": 60, "tests": 180, "update_eager": 120, "update_compiled": 240, "train": 90}
TESTS = ["tests/test_cuda.py", "tests/test_gpu_path.py", "tests/test_mamba1.py"]

INFO = """
import importlib.metadata, json, os, shutil, subprocess, sys
import torch
import drama_xs
device = torch.device(sys.argv[1])
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
info = {
    "device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
    "mamba_ssm": version("mamba-ssm"), "python": sys.version.split()[0], "scan": drama_xs.scan_backend(device),
    "c_compiler": cc and subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\\n")[0],
    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None,
}
if shutil.which("nvidia-smi"):
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip().split("\\n")[0]
print(json.dumps(info))
"""


def run_step(name: str, command: list[str], out_dir: str, limit: float, env: dict) -> dict:
    """Run one step as a subprocess, its output (stdout and stderr) into OUT_DIR/<name>.log, each line with the
    seconds since the step began; kill it at `limit` seconds. Returns status, seconds, log and the timed lines."""
    log_path = os.path.join(out_dir, f"{name}.log")
    lines, start = [], time.time()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=C.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)  # fmt: skip
        def stop():  # the step and whatever it started (its own process group)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(limit, stop)
        timer.start()
        for line in process.stdout:
            lines.append((time.time() - start, line.rstrip("\n")))
            log.write(f"{lines[-1][0]:8.2f} {line}")
            log.flush()
        process.wait()
        timer.cancel()
    seconds = time.time() - start
    status = "ok" if process.returncode == 0 else "time limit" if seconds >= limit else f"exit {process.returncode}"
    print(f"  {name}: {status} in {seconds:.0f} s (log: {log_path})", flush=True)
    return {"status": status, "seconds": round(seconds, 1), "log": os.path.basename(log_path), "lines": lines}


def test_counts(junit_path: str) -> dict | None:
    """passed / failed / skipped from pytest's JUnit XML (errors count as failed)."""
    try:
        suite = ElementTree.parse(junit_path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def update_numbers(lines) -> dict:
    """Seconds per update and the CUDA peak memory from benchmarks/training_step.py's output."""
    text = "\n".join(line for _, line in lines)
    whole = re.search(r"^\| = whole update\s*\|\s*([\d,.]+)", text, re.M)
    peak = re.search(r"CUDA peak ([\d,]+) MiB", text)
    return {
        "seconds_per_update": float(whole[1].replace(",", "")) / 1e3 if whole else None,
        "peak_gpu_memory_mib": int(peak[1].replace(",", "")) if peak else None,
    }


def training_numbers(lines, random_steps: int, total_timesteps: int) -> dict:
    """Seconds per random step and per training step from the progress lines' times; the projection."""
    progress = [(t, int(m[1])) for t, line in lines if (m := re.match(r"step (\d+)/\d+ updates (\d+) ", line))]
    random_part = [(t, s) for t, s in progress if s <= random_steps]
    training = [(t, s) for t, s in progress if s > random_steps][1:]  # the first one holds the compiles
    numbers = {"progress_lines": len(progress), "steps_reached": progress[-1][1] if progress else 0}
    if len(training) < 2:
        return numbers | {"error": "fewer than two progress lines after the first training steps: raise the limit"}
    per_step = (training[-1][0] - training[0][0]) / (training[-1][1] - training[0][1])
    per_random = ((random_part[-1][0] - random_part[0][0]) / max(1, random_part[-1][1] - random_part[0][1])
                  if len(random_part) > 1 else 0.0)  # fmt: skip
    paper_random = min(PAPER_RANDOM_STEPS, total_timesteps)
    hours = (paper_random * per_random + (TOTAL_TIMESTEPS - paper_random) * per_step) / 3600
    return numbers | {
        "buffer_steps_at_first_measured_step": training[0][1],
        "measured_training_steps": training[-1][1] - training[0][1],
        "seconds_per_training_step": round(per_step, 4),
        "seconds_per_random_step": round(per_random, 5),
        f"projected_hours_{TOTAL_TIMESTEPS}_steps": round(hours, 2),
    }


class MemoryPoll:
    """The GPU's largest memory use (nvidia-smi, every 2 s) while a step runs; None without nvidia-smi."""

    def __init__(self):
        self.peak_mib, self.stop = None, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self):
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self.stop.wait(2):
            try:
                used = int(subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.split()[0])
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self.peak_mib = max(self.peak_mib or 0, used)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


def fail(message: str) -> None:
    """One line on stderr and exit status 2 (bad input or a node that cannot run the check)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="the folder for the logs and summary.json (made; must be new or empty)")
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda",
        help="cpu: a dry run of every step at tiny sizes (checks this script; no GPU numbers)",
    )  # fmt: skip
    args = parser.parse_args()
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        fail(f"{args.out_dir} is not empty: name a new folder, so that no earlier check's logs are overwritten")
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    dry = args.device == "cpu"
    limits = DRY_LIMITS if dry else LIMITS
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    caches = compile_cache_folders()  # here, for the subprocesses: the same folders as the scripts
    env.update(caches)
    python = sys.executable
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry, "caches": caches}
    summary_path = os.path.join(out_dir, "summary.json")

    def write_summary():
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)

    print(f"# DRAMA GPU check ({summary['date']}{', dry run on the CPU' if dry else ''}): logs in {out_dir}")
    steps = summary["steps"] = {}
    info_step = run_step("0_info", [python, "-c", INFO, args.device], out_dir, limits["info"], env)
    try:
        summary["machine"] = info = json.loads(info_step["lines"][-1][1])
    except (IndexError, ValueError):
        info = {}
    steps["info"] = {k: v for k, v in info_step.items() if k != "lines"}
    for key in ("gpu", "driver", "torch", "cuda", "triton", "mamba_ssm", "c_compiler", "scan"):
        print(f"  {key}: {info.get(key)}")
    write_summary()
    if not dry and info and not info.get("gpu"):
        fail(f"torch {info.get('torch')} sees no CUDA GPU: use a CUDA build of torch on a GPU node, or --device cpu")
    if not dry and not str(info.get("scan", "")).startswith("fused"):
        why = info.get("scan") or f"step 0 failed, see {info_step['log']}"
        fail(f"the Mamba scan is not fused here ({why}): install CUDA torch, Triton and mamba-ssm, or set PYTHONPATH "
             "to the bundle (benchmarks/gpu_bundle.py, docs/gpu.md)")  # fmt: skip

    junit = os.path.join(out_dir, "tests.xml")
    test_command = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", *TESTS]
    steps["tests"] = {k: v for k, v in run_step("1_tests", test_command, out_dir, limits["tests"], env).items()
                      if k != "lines"}  # fmt: skip
    summary["tests"] = test_counts(junit)
    print(f"  tests: {summary['tests']}")
    write_summary()

    sizes = ["--device", "cpu", "--scale", "0.02", "--repeats", "1", "--buffer-steps", "300", "--threads", "2"]
    update = [python, "benchmarks/training_step.py", "--variants", "drama_xs", "--no-extras", "--precision", "auto"]
    update += sizes if dry else ["--device", "cuda", "--repeats", "3"]
    summary["batch"] = "scaled by 0.02 (dry run)" if dry else "the paper's: world model 16 x 128, imagination 1024"
    summary["updates"] = {}
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        step = run_step(f"{2 if name == 'eager' else 3}_update_{name}", update + flags, out_dir,
                        limits[f"update_{name}"], env)  # fmt: skip
        summary["updates"][name] = update_numbers(step["lines"])
        steps[f"update_{name}"] = {k: v for k, v in step.items() if k != "lines"}
        print(f"  update, {name}: {summary['updates'][name]}")
        write_summary()

    random_steps = 200 if dry else BUFFER_STEPS
    train = [python, "-u", "drama_xs.py", "--env-id", "ALE/Krull-v5", "--precision", "auto", "--total-timesteps",
             str(TOTAL_TIMESTEPS), "--random-steps", str(random_steps), "--eval-episodes", "0", "--no-save-model",
             "--checkpoint-every", "0", "--dream-every", "0", "--log-every", "100000",
             "--run-dir", os.path.join(out_dir, "train_run"), "--device", args.device]  # fmt: skip
    if dry:  # a small model and batch, so that the CPU reaches updates within the time limit
        train += ["--sequence-length", "32", "--batch-size", "2", "--imagine-batch-size", "16", "--d-model", "64",
                  "--headdim", "32", "--encoder-filters", "4", "8", "8", "8", "8", "--torch-threads", "2"]  # fmt: skip
    with MemoryPoll() as memory:
        step = run_step("4_train", train, out_dir, limits["train"], env)
    summary["training"] = training_numbers(step["lines"], random_steps, TOTAL_TIMESTEPS)
    summary["training"]["peak_gpu_memory_mib"] = memory.peak_mib
    steps["train"] = {k: v for k, v in step.items() if k != "lines"}
    steps["train"]["note"] = "stopped at its time limit by design"
    print(f"  training: {summary['training']}")
    summary["seconds"] = round(sum(s["seconds"] for s in steps.values()), 1)
    write_summary()
    print(f"summary: {summary_path} ({summary['seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
