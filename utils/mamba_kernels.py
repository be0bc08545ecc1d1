"""mamba_ssm's fused scan kernels for the scripts' Mamba mixers, or why they cannot load (the mixers then run
their pure-PyTorch scans).

`import mamba_ssm` runs the package's __init__, which imports the compiled selective-scan extension and, through
mamba_ssm.utils.generation, transformers. The Mamba-2 scan (mamba_ssm.ops.triton.ssd_combined) is pure Triton and
needs neither, so `load_ssd_scan` imports that module and what it imports without running the package's
__init__: a mamba-ssm built in seconds with MAMBA_SKIP_CUDA_BUILD=TRUE is enough (docs/gpu.md). The Mamba-1
kernel (`load_selective_scan`) is the compiled extension itself and needs mamba-ssm's full build.
"""

import importlib
import importlib.metadata
import importlib.util
import sys

from utils.compile_cache import compile_cache_folders


def mamba_ssm_version() -> str:
    """The installed mamba-ssm's version, from its package metadata (its __init__ is never run here)."""
    try:
        return importlib.metadata.version("mamba-ssm")
    except importlib.metadata.PackageNotFoundError:  # e.g. a source checkout on PYTHONPATH
        return "(version unknown)"


def _import_submodule(name: str):
    """Import mamba_ssm.<...> `name` without running mamba_ssm/__init__.py.

    While the submodules import (they import each other by absolute name), an empty package object with the
    installed package's path stands in for mamba_ssm; it leaves sys.modules afterwards, so that a later
    `import mamba_ssm` elsewhere runs the real __init__. A mamba_ssm already imported is used as it is."""
    if "mamba_ssm" in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.find_spec("mamba_ssm")  # finds the package without executing it
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError("No module named 'mamba_ssm'", name="mamba_ssm")
    package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not executed
    sys.modules["mamba_ssm"] = package
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("mamba_ssm") is package:
            del sys.modules["mamba_ssm"]


def _failure(error: Exception) -> str:
    """One line on why a kernel did not load."""
    if isinstance(error, ImportError) and error.name == "mamba_ssm":
        return "mamba_ssm is not installed"
    if isinstance(error, ImportError) and error.name in ("triton", "einops"):
        return f"mamba_ssm's Triton kernels need {error.name}, which is not installed"
    return f"mamba_ssm failed: {error}"


def load_ssd_scan():
    """(mamba_chunk_scan_combined, None), or (None, why not): mamba_ssm's fused Mamba-2 scan (Triton)."""
    compile_cache_folders()  # before the kernels are defined: their autotuner reads TRITON_CACHE_AUTOTUNING then
    try:
        return _import_submodule("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined, None
    except Exception as error:  # not installed, or broken: an ABI mismatch, a Triton that does not import
        return None, _failure(error)


def load_selective_scan():
    """(selective_scan_fn, None), or (None, why not): mamba_ssm's fused Mamba-1 scan (its compiled CUDA extension,
    which a mamba-ssm built with MAMBA_SKIP_CUDA_BUILD=TRUE lacks)."""
    without = "mamba_ssm was built without its CUDA extension selective_scan_cuda: drama_mamba1.py's fused scan needs "
    without += "mamba-ssm's full build (docs/gpu.md)"
    try:
        interface = _import_submodule("mamba_ssm.ops.selective_scan_interface")
    except Exception as error:  # 2.3.2.post1 imports the extension unconditionally
        missing_extension = isinstance(error, ImportError) and error.name == "selective_scan_cuda"
        return None, without if missing_extension else _failure(error)
    if getattr(interface, "selective_scan_cuda", None) is None:  # an optional import after mamba_ssm 2.3.2.post1
        return None, without
    return interface.selective_scan_fn, None
