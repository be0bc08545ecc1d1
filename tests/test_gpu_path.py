"""The CUDA path's logic, checked on a CPU: which scan runs and why (mamba_ssm absent, broken, without its CUDA
extensions or without Triton; fake packages), how its kernels load, the compiler check and the compile cache
folders, no GPU->CPU syncs from argument validation, and mixer states that do not make a compiled step compile
twice.

What only a GPU can show is in test_cuda.py; the fused scan's maths under Triton's interpreter in
test_fused_scan.py.
"""

import importlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from utils import UserError
from utils.checks import check_compiler
from utils.compile_cache import compile_cache_folders
from utils.mamba_kernels import load_ssd_scan

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["drama_xs", "drama_s", "drama_mamba1", "drama_uniform_sampling"]

# fake mamba_ssm packages: {relative path: source}. Their __init__ raises, as a build without the CUDA extensions
# (or without transformers) does: the scripts never run it; the version comes from the package metadata.
INIT = {
    "mamba_ssm/__init__.py": 'raise ImportError("No module named \'selective_scan_cuda\'")',
    "mamba_ssm-9.8.7.dist-info/METADATA": "Metadata-Version: 2.1\nName: mamba_ssm\nVersion: 9.8.7\n",
}
UNDEFINED = 'raise ImportError("libc10_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")'
BROKEN = INIT | {
    "mamba_ssm/ops/__init__.py": "",
    "mamba_ssm/ops/triton/__init__.py": "",
    "mamba_ssm/ops/triton/ssd_combined.py": UNDEFINED,
    "mamba_ssm/ops/selective_scan_interface.py": UNDEFINED,
}
WORKING = BROKEN | {
    "mamba_ssm/ops/triton/ssd_combined.py": "def mamba_chunk_scan_combined(*args, **kwargs): ...",
    "mamba_ssm/ops/selective_scan_interface.py": "selective_scan_cuda = object()\ndef selective_scan_fn(): ...",
}
# a build without the CUDA extensions (MAMBA_SKIP_CUDA_BUILD=TRUE): after 2.3.2.post1 the Mamba-1 module imports
# without its kernel; the Mamba-2 scan is Triton and needs none
WITHOUT_SELECTIVE_SCAN_CUDA = WORKING | {
    "mamba_ssm/ops/selective_scan_interface.py": "selective_scan_cuda = None\ndef selective_scan_fn(): ..."
}
WITHOUT_TRITON = WORKING | {
    "mamba_ssm/ops/triton/ssd_combined.py": "raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')"
}


def load_with_fake_mamba_ssm(variant: str, files: dict[str, str] | None, tmp_path, monkeypatch):
    """Import a fresh copy of the script as if `files` were the installed mamba_ssm (None: not installed)."""
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    if files is not None:
        for path, source in files.items():
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location(f"{variant}_fake_mamba_ssm", ROOT / f"{variant}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)  # the fake stays out of every later test
    return module


CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("variant", ["drama_xs", "drama_mamba1"])
def test_start_up_line_says_which_scan_runs_and_why(variant, tmp_path, monkeypatch):
    absent = load_with_fake_mamba_ssm(variant, None, tmp_path / "absent", monkeypatch)
    if importlib.util.find_spec("mamba_ssm") is None:
        assert absent.scan_backend(CUDA) == "pure PyTorch (mamba_ssm is not installed)"
        assert absent.scan_backend(CPU) == "pure PyTorch (running on cpu; mamba_ssm is not installed)"
    broken = load_with_fake_mamba_ssm(variant, BROKEN, tmp_path / "broken", monkeypatch)
    assert broken.scan_backend(CUDA) == (
        "pure PyTorch (mamba_ssm failed: libc10_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice)"
    )
    working = load_with_fake_mamba_ssm(variant, WORKING, tmp_path / "working", monkeypatch)
    assert working.scan_backend(CUDA) == "fused mamba_ssm 9.8.7"
    assert working.scan_backend(CPU) == "pure PyTorch (running on cpu)"
    kernel = working.selective_scan_fn if variant == "drama_mamba1" else working.mamba_chunk_scan_combined
    assert kernel is not None
    assert working.TRITON_SCAN == (variant != "drama_mamba1")  # start_run then asks for a C compiler on CUDA


@pytest.mark.parametrize("interface", ["optional", "required"])
def test_mamba1_without_selective_scan_cuda_is_unavailable(interface, tmp_path, monkeypatch):
    """A build without the CUDA extensions: 2.3.2.post1's import fails, mamba_ssm main's succeeds and the first
    fused call would raise. Both fall back, and say why."""
    files = WITHOUT_SELECTIVE_SCAN_CUDA
    if interface == "required":
        source = "raise ModuleNotFoundError(\"No module named 'selective_scan_cuda'\", name='selective_scan_cuda')"
        files = files | {"mamba_ssm/ops/selective_scan_interface.py": source}
    mamba1 = load_with_fake_mamba_ssm("drama_mamba1", files, tmp_path, monkeypatch)
    assert mamba1.selective_scan_fn is None
    assert mamba1.scan_backend(CUDA) == (
        "pure PyTorch (mamba_ssm was built without its CUDA extension selective_scan_cuda: drama_mamba1.py's fused "
        "scan needs mamba-ssm's full build (docs/gpu.md))"
    )
    xs = load_with_fake_mamba_ssm("drama_xs", WITHOUT_SELECTIVE_SCAN_CUDA, tmp_path, monkeypatch)
    assert xs.scan_backend(CUDA) == "fused mamba_ssm 9.8.7"  # Mamba-2's Triton scan does not need it
    assert xs.Mamba2(32, 8, 4, 2, 16, 4).fused_scan_on == "cuda"


def test_mamba2_without_triton_says_so(tmp_path, monkeypatch):
    xs = load_with_fake_mamba_ssm("drama_xs", WITHOUT_TRITON, tmp_path, monkeypatch)
    assert xs.scan_backend(CUDA) == "pure PyTorch (mamba_ssm's Triton kernels need triton, which is not installed)"
    assert not xs.TRITON_SCAN and xs.Mamba2(32, 8, 4, 2, 16, 4).fused_scan_on is None


def test_loading_the_kernel_leaves_import_mamba_ssm_to_the_real_package(tmp_path, monkeypatch):
    """The stand-in package object lives only while the kernel imports: a later `import mamba_ssm` (a user's, or
    mamba_ssm's own modules) runs the package's real __init__."""
    files = WORKING | {"mamba_ssm/__init__.py": '__version__ = "9.8.7"\nREAL_INIT = True'}
    for path, source in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    kernel, error = load_ssd_scan()
    assert kernel is not None and error is None and "mamba_ssm" not in sys.modules
    import mamba_ssm

    assert mamba_ssm.REAL_INIT
    assert load_ssd_scan()[0] is kernel  # an imported mamba_ssm is used as it is
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture(params=VARIANTS, scope="module")
def mod(request):
    return importlib.import_module(request.param)


def tiny_args(mod, **overrides):
    sizes = dict(encoder_filters=(4, 4, 4, 4, 4), d_model=32, d_state=8, stoch_categoricals=4, stoch_classes=4)
    if hasattr(mod.Args, "headdim"):
        sizes |= dict(headdim=16, chunk_size=4)
    return mod.Args(**(sizes | overrides))


def test_triton_on_cuda_without_a_c_compiler_is_a_one_line_error(monkeypatch):
    """Triton builds C launchers at run time: for --compile on CUDA and for the fused Mamba-2 scan alike."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(UserError, match="--compile on CUDA needs a C compiler for Triton") as error:
        check_compiler(CUDA, compile=True)
    assert "\n" not in str(error.value) and "drop --compile" in str(error.value)
    for compile in (False, True):  # dropping --compile does not help the fused scan
        with pytest.raises(UserError, match="fused Mamba-2 scan builds Triton kernels on CUDA and needs a C compiler"):
            check_compiler(CUDA, compile=compile, triton_scan=True)
    check_compiler(CUDA, compile=False)  # the pure-PyTorch scan, eager: nothing is built
    check_compiler(CPU, compile=False, triton_scan=True)  # the scan is fused on CUDA only
    monkeypatch.setenv("CC", "/opt/cc")  # Triton takes $CC first
    check_compiler(CUDA, compile=True, triton_scan=True)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    monkeypatch.delenv("CC")
    check_compiler(CUDA, compile=True, triton_scan=True)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):  # the CPU needs C++, not C
        check_compiler(CPU, compile=True)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": "/nonexistent/include/python3"})
    with pytest.raises(UserError, match="apt-get install python3-dev\\)$"):  # a system Python without its headers
        check_compiler(CUDA, compile=False, triton_scan=True)


def test_compile_cache_folders_default_under_the_user_cache_and_keep_the_users(monkeypatch, tmp_path):
    for name in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_AUTOTUNING"):
        monkeypatch.setenv(name, "")  # restored (or removed) after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/scratch/inductor")
    assert compile_cache_folders() == {
        "TRITON_CACHE_DIR": str(tmp_path / "drama" / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": "/scratch/inductor",
        "TRITON_CACHE_AUTOTUNING": "1",
    }
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "drama" / "triton")


def test_policy_skips_argument_validation(mod):
    """Validating a Categorical's logits syncs a GPU with the CPU on every construction (16 per rollout)."""
    torch.manual_seed(0)
    args = tiny_args(mod)
    actor_critic = mod.ActorCritic(args, 48, 5)
    features = torch.randn(3, 48)
    features[0, 0] = torch.nan  # a validating Categorical raises ValueError on NaN logits
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(True)
    try:
        policy = actor_critic.policy(features)
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)
    assert policy.logits.shape == (3, 5) and not policy._validate_args


def test_forward_returns_fp32_contiguous_states_under_bf16_autocast(mod):
    """step 0 of a compiled imagination step gets forward's states, later steps get step's: one type for both."""
    torch.manual_seed(0)
    mixer = mod.MambaBlock(tiny_args(mod)).mixer
    u = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = mixer(u)
        assert y.dtype == torch.bfloat16  # autocast did run the projections in bf16
        for tensor in state:
            assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        _, stepped = mixer.forward_token(u[:, 0], state)
        for before, after in zip(state, stepped, strict=True):
            assert after.dtype == torch.float32 and after.is_contiguous() and after.shape == before.shape
    _, state = mixer.double()(u.double())
    assert all(tensor.dtype == torch.float64 for tensor in state)  # never lowered: float64 checks stay exact


@pytest.mark.parametrize("variant", ["drama_xs", "drama_uniform_sampling"])
def test_replay_buffer_goes_to_pinned_host_memory_when_the_gpu_is_short(variant, monkeypatch, capsys):
    """On a GPU the steps stay there when they take at most half its free memory; else pinned host memory, said in
    one line. On a CPU: plain memory, nothing said."""
    mod = importlib.import_module(variant)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8_000_000_000, 80_000_000_000))
    assert mod.replay_storage(1_200_000_000, CUDA) == (CUDA, False)
    assert capsys.readouterr().out == ""
    assert mod.replay_storage(4_000_000_001, CUDA) == (CPU, True)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("replay buffer: 4.0 GB is more than half of the GPU's 8.0 GB free: kept in pinned host")
    assert mod.replay_storage(10**12, CPU) == (CPU, False) and capsys.readouterr().out == ""
