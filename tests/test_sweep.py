"""utils.sweep: a local sweep of real training runs, a killed run resumed exactly, Slurm's sbatch script, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
from safetensors.torch import load_file
from submitit.slurm.test_slurm import mocked_slurm

from utils import sweep

ROOT = Path(__file__).resolve().parents[1]
# docs/sweeps.md's local sweep, shrunk: a run takes seconds; a checkpoint at step 24 of 32, after 8 of 16 updates.
TINY = (
    "--total-timesteps 32 --random-steps 16 --checkpoint-every 24 --eval-episodes 1 --batch-size 2 "
    "--sequence-length 8 --imagine-batch-size 4 --imagine-context-length 4 --imagine-horizon 2 --d-model 32 "
    "--headdim 16 --encoder-filters 4 4 4 4 4 --stoch-categoricals 4 --stoch-classes 4 --act-context-length 4 "
    "--actor-hidden 16 --critic-hidden 16 --head-hidden 16 --torch-threads 1"
).split()
GAMES = ["ALE/Breakout-v5", "ALE/Qbert-v5"]  # short episodes: the one-episode evaluation is quick


def sweep_command(sweep_dir: Path) -> list[str]:
    return [sys.executable, "-m", "utils.sweep", "run", str(sweep_dir), "--env-ids", *GAMES, "--seeds", "1", "2",
            "--executor", "local", "--parallel", "2", "--", *TINY]  # fmt: skip


def test_local_sweep_resumes_a_killed_run_exactly_and_skips_finished_runs(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    killed = sweep_dir / "drama_xs" / "Qbert" / "seed2"
    reference = subprocess.Popen(  # the same run, uninterrupted
        [sys.executable, str(ROOT / "drama_xs.py"), "--env-id", "ALE/Qbert-v5", "--seed", "2", *TINY,
         "--run-dir", str(tmp_path / "reference")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = subprocess.Popen(sweep_command(sweep_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    halfway = load_file(killed / "checkpoint.safetensors")
    os.kill(json.loads((killed / sweep.STATE).read_text())["train_pid"], signal.SIGKILL)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 2, err
    assert err.decode().strip().splitlines()[-1] == (
        "error: 1 of 4 runs failed: re-run the same command to resume them"
    )

    assert sweep.main(["status", str(sweep_dir)]) == 0
    table = capsys.readouterr().out
    assert "4 runs: 3 done, 0 running, 0 pending, 1 failed" in table
    (failed,) = [line for line in table.splitlines() if "failed " in line]
    assert failed.startswith("drama_xs/Qbert/seed2") and "killed by SIGKILL" in failed
    assert not (sweep_dir / "aggregate").exists()  # not before every run is done

    again = subprocess.run(sweep_command(sweep_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "1 to run (0 to start, 1 to resume), 3 done, 0 queued or running" in again.stdout
    assert "4 runs: 4 done, 0 running, 0 pending, 0 failed" in again.stdout
    assert "resuming" in (killed / sweep.LOG).read_text()
    assert {p.name for p in (sweep_dir / "aggregate").iterdir()} == {"aggregate.csv", "per_game.csv", "aggregate.png"}
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    straight = load_file(tmp_path / "reference" / "agent.safetensors")
    resumed = load_file(killed / "agent.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not all(torch.equal(halfway[f"agent.{k}"], resumed[k]) for k in resumed)  # it trained after resuming

    jobs_before = set((sweep_dir / "submitit").iterdir())
    assert sweep.main(sweep_command(sweep_dir)[3:]) == 0  # the finished sweep again: nothing to submit
    out = capsys.readouterr().out
    assert out.startswith("0 to run (0 to start, 0 to resume), 4 done, 0 queued or running\n")
    assert set((sweep_dir / "submitit").iterdir()) == jobs_before
    assert "drama_xs     2     4" in out  # the aggregate: 2 games, 4 runs
    print(table, out)  # pytest -s shows the status table and the aggregate


def test_slurm_dry_run_shows_the_sbatch_script_and_writes_nothing(tmp_path, capsys):
    sweep_dir = tmp_path / "table1"
    argv = ["run", str(sweep_dir), "--executor", "slurm", "--partition", "gpu", "--account", "rl", "--timeout-min",
            "240", "--parallel", "3", "--env-ids", "Pong", "Breakout", "--seeds", "1", "2", "--dry-run", "--",
            "--checkpoint-every", "5000"]  # fmt: skip
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    print(out)  # pytest -s shows the generated sbatch script
    pong = sweep_dir / "drama_xs" / "Pong" / "seed1"
    assert f"start  {sys.executable} {ROOT / 'drama_xs.py'} --env-id ALE/Pong-v5 --seed 1 --checkpoint-every 5000 " \
        f"--run-dir {pong}" in out  # fmt: skip
    assert "4 to run (4 to start, 0 to resume), 0 done, 0 queued or running" in out
    for line in ["#SBATCH --partition=gpu", "#SBATCH --account=rl", "#SBATCH --time=240", "#SBATCH --array=0-3%3",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR2@90",
                 "#SBATCH --open-mode=append"]:  # fmt: skip
        assert line in out.splitlines()
    assert "-u -m submitit.core._submit" in out and "srun" in out
    assert not sweep_dir.exists()


def test_slurm_submission_is_one_array_with_the_dry_run_script(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    argv = ["run", str(sweep_dir), "--executor", "slurm", "--partition", "gpu", "--env-ids", "Pong", "--seeds", "1",
            "2", "--", "--checkpoint-every", "5000"]  # fmt: skip
    with mocked_slurm():  # submitit's stand-in for srun, sbatch and sacct
        assert sweep.main(argv) == 0
        assert "submitted 2 jobs as Slurm array 12" in capsys.readouterr().out
        assert sweep.main([*argv[:-3], "--dry-run", *argv[-3:]]) == 0  # already queued: nothing to run
        assert "0 to run (0 to start, 0 to resume), 0 done, 2 queued or running" in capsys.readouterr().out
        assert sweep.main(["status", str(sweep_dir)]) == 0
    table = capsys.readouterr().out
    assert "drama_xs/Pong/seed2  pending  job 12_1 submitted" in table
    assert "2 runs: 0 done, 0 running, 2 pending, 0 failed" in table
    (script,) = (sweep_dir / "submitit").rglob("*submission.sh")
    assert script.read_text() == sweep.sbatch_script(sweep_dir, dict(
        job_name="sweep-sweep", partition="gpu", time=24 * 60, gpus_per_task=1, cpus_per_task=8, array_parallelism=1,
    ), 2)  # fmt: skip


def test_checkpoint_stops_the_run_and_requeues_the_same_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    job = sweep.TrainingJob("drama_xs.py", "ALE/Pong-v5", 1, ["--eval-episodes", "1"], str(tmp_path))
    assert "--resume" not in job.command()
    job._process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    process = job._process
    delayed = job.checkpoint()
    assert process.poll() == -signal.SIGUSR2  # stopped (a script saves at its step boundary first): it resumes
    assert delayed.function is job and job._process is None
    requeued = cloudpickle.loads(cloudpickle.dumps(delayed))
    (tmp_path / "checkpoint.safetensors").touch()
    assert requeued.function.command()[2:] == ["--resume", str(tmp_path)]
    assert json.loads((tmp_path / sweep.STATE).read_text())["state"] == "requeued"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scripts", "drama_xl.py"], "error: unknown script 'drama_xl.py': pick from drama_xs.py, drama_s.py, "
         "drama_mamba1.py, drama_uniform_sampling.py"),
        (["--env-ids", "Pongg"], "error: Unknown env id 'ALE/Pongg-v5': expected a registered 'ALE/<Game>-v5' id. "
         "Did you mean 'ALE/Pong-v5'?"),
        (["--seeds"], "error: --seeds is empty: give one or more seeds, e.g. --seeds 1 2 3 4 5"),
        (["--seeds", "3"], "holds a sweep made by another command (python -m utils.sweep run"),
        (["--executor", "slurm", "--timeout-min", "2"], "error: --timeout-min 2 is too short for Slurm: the job gets "
         "SIGUSR2 (stop and save) 90 s before its time limit, and needs time to start and save first: give "
         "--timeout-min 3 or more"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(tmp_path, capsys, flags, message):
    (tmp_path / "sweep.json").write_text(json.dumps({
        "scripts": ["drama_xs.py"], "env_ids": ["ALE/Pong-v5"], "seeds": [1], "flags": [],
        "command": "python -m utils.sweep run sweep --env-ids Pong --seeds 1",
    }))  # fmt: skip
    assert sweep.main(["run", str(tmp_path), "--env-ids", "Pong", *flags, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("commands", [(), ("srun",)])
def test_slurm_without_its_commands_is_one_line_and_submits_nothing(tmp_path, capsys, monkeypatch, commands):
    """No Slurm on the PATH, or srun without sbatch: one line naming the fix, no run marked as submitted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in commands:
        (bin_dir / command).write_text("#!/bin/sh\n")
        (bin_dir / command).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert sweep.main(["run", str(tmp_path / "sweep"), "--executor", "slurm", "--env-ids", "Pong", "--seeds", "1"]) == 2
    missing = "no sbatch here" if commands else "no srun here"
    assert capsys.readouterr().err == (
        f"error: --executor slurm needs Slurm's {'sbatch' if commands else 'sbatch and srun'} on the PATH ({missing}): "
        "run it on the cluster's login node, or use --executor local\n"
    )
    assert not list(tmp_path.rglob(sweep.STATE))


def test_status_of_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    assert sweep.main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path} is not a sweep folder (no sweep.json): pass the folder given to utils.sweep run\n"
    )


def test_a_resumed_job_keeps_the_flags_a_resume_takes_from_its_command_line(tmp_path):
    """--resume takes --device and --compile from the command line, so the sweep passes them again (and the run's
    own --torch-threads, which a resumed run would keep anyway)."""
    job = sweep.TrainingJob("drama_xs.py", "ALE/Pong-v5", 1, [*TINY, "--device=cpu", "--compile"], str(tmp_path))
    (tmp_path / "checkpoint.safetensors").write_bytes(b"")
    assert job.command()[2:] == ["--resume", str(tmp_path), "--torch-threads", "1", "--device=cpu", "--compile"]
