"""Build the one folder that benchmarks/gpu_check.py needs on an offline GPU node: `PYTHONPATH=FOLDER` is then the
only set-up there (the node brings CUDA torch and Triton, nothing else of ours).

Run it on any machine with network, for the GPU node's Python version and platform:

    python benchmarks/gpu_bundle.py gpu-bundle --python-version 3.12 --platform manylinux_2_28_x86_64

What it installs with `pip install --target FOLDER`: what the check imports of pyproject.toml's dependencies (not
torch, not moviepy, matplotlib or submitit), pytest, einops and packaging (mamba_ssm's Triton kernels import them),
as binary wheels for that Python and platform; then mamba-ssm built without its CUDA extensions (pure Python, the
same files for every Python version: built here, so this machine needs torch, setuptools, wheel and packaging).
It prints the folder's size, which must stay well under 64 MiB (the most a device call carries).
"""

import argparse
import contextlib
import os
import subprocess
import sys

# what the check imports (drama_xs.py, utils/, the tests, benchmarks/training_step.py), with pyproject's bounds
NEEDS = [
    "gymnasium>=1.0,<2",
    "ale-py>=0.10.2",
    "tyro>=0.8",
    "numpy>=1.24",
    "tensorboard>=2.12",
    "huggingface-hub>=0.20",
    "safetensors>=0.4",
    "pillow>=9",
    "pytest>=8",
    "einops",
    "packaging",
]
MAMBA_SSM = "mamba-ssm==2.3.2.post1"
# what the check never imports (removed after the install, to stay under the limit): tensorboard's gRPC server,
# huggingface-hub's optional Xet downloader; setuptools where torch itself requires it (Python 3.12 and later:
# Inductor imports it); numpy comes with the GPU image's torch stack (--with-numpy keeps it)
UNUSED = ["grpcio", "hf_xet"]
UNUSED_FILES = ["tensorboard/webfiles.zip", "tensorboard/plugins/projector/tf_projector_plugin/projector_binary.js"]
# ^ TensorBoard's web app: the node writes logs, it serves no pages
LIMIT_MIB = 64


def platform_tags(platform: str) -> list[str]:
    """manylinux_2_N_ARCH and every older manylinux tag that such a system runs (pip before 23.3 does not expand
    --platform itself: a wheel tagged manylinux_2_17 would not be found for manylinux_2_28)."""
    parts = platform.split("_", 3)
    if len(parts) != 4 or parts[0] != "manylinux" or not parts[2].isdigit():
        return [platform]
    newest, arch = int(parts[2]), parts[3]
    return [f"manylinux_2_{n}_{arch}" for n in range(newest, 16, -1)] + [f"manylinux2014_{arch}"]


def remove_distribution(folder: str, name: str) -> None:
    """Delete an installed distribution's files (its dist-info RECORD lists them): pip uninstall skips --target."""
    infos = [d for d in os.listdir(folder) if d.endswith(".dist-info") and d.split("-")[0].lower() == name.lower()]
    for info in infos:
        with open(os.path.join(folder, info, "RECORD")) as record:
            paths = {os.path.normpath(os.path.join(folder, line.rsplit(",", 2)[0])) for line in record if line.strip()}
        for path in paths:
            if os.path.isfile(path) and path.startswith(os.path.abspath(folder)):
                os.remove(path)
        for top, dirs, _ in os.walk(folder, topdown=False):  # the folders left empty
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(top, d))


def folder_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the folder to make (PYTHONPATH on the GPU node)")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the GPU node's Python, e.g. 3.12 (default: this one)")  # fmt: skip
    parser.add_argument("--platform", default="manylinux_2_28_x86_64",
                        help="the GPU node's wheel platform (manylinux_2_28_aarch64 for Grace Hopper)")  # fmt: skip
    parser.add_argument("--with-numpy", action="store_true", help="keep numpy (for a node whose Python lacks it)")
    args = parser.parse_args()
    if os.path.exists(args.folder) and os.listdir(args.folder):
        print(f"error: {args.folder} exists and is not empty: name a new folder", file=sys.stderr)
        sys.exit(2)
    args.folder = os.path.abspath(args.folder)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", args.folder]
    wheels = ["--only-binary=:all:", "--implementation", "cp", "--python-version", args.python_version]
    wheels += [flag for tag in platform_tags(args.platform) for flag in ("--platform", tag)]
    subprocess.run(pip + wheels + NEEDS, check=True)
    env = {**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE", "MAMBA_FORCE_BUILD": "TRUE"}  # offline: no wheel download
    subprocess.run(pip + ["--no-build-isolation", "--no-deps", MAMBA_SSM], check=True, env=env)
    torch_brings_setuptools = tuple(map(int, args.python_version.split(".")[:2])) >= (3, 12)
    for name in UNUSED + ([] if args.with_numpy else ["numpy"]) + (["setuptools"] if torch_brings_setuptools else []):
        remove_distribution(args.folder, name)
    for path in UNUSED_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.folder, path))
    size = folder_mib(args.folder)
    print(f"{args.folder}: {size:.1f} MiB for Python {args.python_version} on {args.platform}"
          f"{'' if size < LIMIT_MIB else f' (over {LIMIT_MIB} MiB: too big to carry)'}")  # fmt: skip
    print(f"on the GPU node: PYTHONPATH={args.folder} python benchmarks/gpu_check.py OUT_DIR")
    sys.exit(0 if size < LIMIT_MIB else 1)


if __name__ == "__main__":
    main()
