"""benchmarks/gpu_check.py (the one-call GPU check) and benchmarks/gpu_bundle.py (the folder it needs on an offline
node), checked on a CPU: the check's dry run runs every step at tiny sizes, so the script cannot rot unnoticed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_bundle import platform_tags  # noqa: E402  (benchmarks/ is not a package)


def test_check_refuses_a_folder_with_an_earlier_checks_logs(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert (tmp_path / "summary.json").read_text() == "{}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check runs in full (minutes)")
def test_check_without_a_gpu_stops_after_what_runs_here_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "sees no CUDA GPU" in result.stderr
    assert result.returncode == 2 and result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["machine"]["torch"] and "scan" in summary["machine"] and list(summary["steps"]) == ["info"]


def test_bundle_asks_pip_for_every_older_manylinux_tag():
    """pip before 23.3 does not expand --platform: safetensors' manylinux_2_17 wheel would not be found."""
    tags = platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert len(tags) == 13 and platform_tags("macosx_14_0_arm64") == ["macosx_14_0_arm64"]


@pytest.mark.slow
def test_check_dry_run_on_cpu(tmp_path):
    """Every step at tiny sizes on the CPU: the tests, both update timings, training, the summary (~3.5 min)."""
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--device", "cpu"],
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["failed"] == 0 and summary["tests"]["passed"] > 0
    for name in ("eager", "compiled"):
        assert summary["updates"][name]["seconds_per_update"] > 0
    assert summary["training"]["seconds_per_training_step"] > 0
    assert summary["training"]["projected_hours_100000_steps"] > 0
    assert {s["status"] for name, s in summary["steps"].items() if name != "train"} == {"ok"}
    for step in summary["steps"].values():
        assert (out / step["log"]).stat().st_size > 0
