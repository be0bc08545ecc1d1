"""Where compiled kernels are kept: Triton's (mamba_ssm's scan, `--compile` on CUDA) and Inductor's (`--compile`)
in folders that survive between runs, so that a machine pays the first-call compiles once (docs/gpu.md)."""

import os


def compile_cache_folders() -> dict[str, str]:
    """Keep Triton's and Inductor's compiled kernels (and Triton's autotuning choices) in a folder that survives
    between runs, so that a machine pays the first-call compiles once: $XDG_CACHE_HOME/drama (default
    ~/.cache/drama), where the user has not named other folders. Sets them in os.environ; returns the variables.

    Called before mamba_ssm's kernels are imported (Triton reads TRITON_CACHE_AUTOTUNING when a kernel is defined)
    and again when a run starts (Inductor and Triton read the folders when they compile)."""
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "drama")
    defaults = {
        "TRITON_CACHE_DIR": os.path.join(root, "triton"),  # Triton's own default: ~/.triton/cache
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor"),  # inductor's default: /tmp/torchinductor_<user>
        "TRITON_CACHE_AUTOTUNING": "1",  # autotuning timings on disk (Triton >= 3.4), not rerun in every process
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in defaults}
