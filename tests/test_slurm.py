"""utils.sweep on a real single-node Slurm cluster (utils/slurm_local.py), through submitit's Slurm executor, at the
tiny scale of test_sweep.py: a sweep cancelled with scancel resumes and finishes, then submits nothing; a preempted
job and a job at its time limit stop at the signal, are requeued and end with the weights of an uninterrupted run;
`--max-requeues` is respected; a job whose node dies is resumed from its last checkpoint; a failed run shows its last
log line; sbatch's refusal is one line.

Needs root (the cluster's daemons) and Debian's slurm-wlm and munge (installed with apt-get where missing); skipped
with one line elsewhere. The slow ones: `pytest -q -m "slurm and slow"` (6.5 minutes on 2 cores).

A requeued job may start again 11 s later (the cluster's `cred_expire`; Slurm's default holds it 121 s).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sweep import GAMES, TINY

from utils import UserError, slurm_local, sweep
from utils.checkpoint import read_training_state

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
STOPPED = re.compile(r"stopped by (SIG\w+) at step (\d+)/")
RESUMED = re.compile(r"resuming \S+ at step (\d+)")


def tiny(total: int, every: int) -> list[str]:
    """TINY with another total and checkpoint interval."""
    flags = list(TINY)
    flags[flags.index("--total-timesteps") + 1] = str(total)
    flags[flags.index("--checkpoint-every") + 1] = str(every)
    return flags


LONG = tiny(800, 200)  # about 40 s of training on one core: time to stop it a few times


def skip_or_fail(why: str) -> None:
    """Skip where no cluster can start; fail instead where DRAMA_REQUIRE_SLURM=1 (.ci/run: the tests must run)."""
    if os.environ.get("DRAMA_REQUIRE_SLURM") == "1":
        pytest.fail(f"DRAMA_REQUIRE_SLURM=1, but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A single-node Slurm for this module; SLURM_CONF names it (for sbatch, squeue, scontrol, utils.sweep)."""
    why = slurm_local.why_not_here()
    if why:
        skip_or_fail(why)
    local = slurm_local.LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        local.start()
    except UserError as error:
        local.stop()
        skip_or_fail(f"the local Slurm cluster did not start: {error}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(local.conf)
    yield local
    local.stop()
    if previous is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run that the preempted and node-failure tests interrupt, trained uninterrupted (started once, in the
    background): the folder of its agent, once it has finished."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "drama_xs.py"), "--env-id", GAMES[0], "--seed", "1",
                                *LONG, "--run-dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip

    def finished() -> Path:
        assert process.wait(timeout=600) == 0, process.stderr.read()
        return folder

    yield finished
    if process.poll() is None:
        process.kill()


def run_sweep(sweep_dir: Path, env_ids: list[str], seeds: list[str], flags: list[str], *options: str):
    """`python -m utils.sweep run` on the cluster: CPU jobs of one core, 2 at a time."""
    command = [sys.executable, "-m", "utils.sweep", "run", str(sweep_dir), "--executor", "slurm", "--env-ids",
               *env_ids, "--seeds", *seeds, "--gpus-per-task", "0", "--cpus-per-task", "1", "--parallel", "2",
               *options, "--", *flags]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def status(sweep_dir: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "utils.sweep", "status", str(sweep_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def status_once(sweep_dir: Path, text: str, timeout_s: float) -> str:
    """The status table, once it shows `text`."""
    return wait_for(lambda: next((table for table in [status(sweep_dir)] if text in table), None), timeout_s,
                    f"status: {text}")  # fmt: skip


def jobs() -> list[tuple[str, str, str]]:
    """(job id, state, reason) of every job Slurm knows, ended ones included."""
    listed = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T %r"], capture_output=True, text=True).stdout
    return [tuple(line.split(maxsplit=2)) for line in listed.splitlines()]


def wait_for(condition, timeout_s: float, what: str):
    """Poll `condition` until it returns something true; return it."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; Slurm's jobs: {jobs()}")


def log_of(run_dir: Path) -> str:
    log = run_dir / sweep.LOG
    return log.read_text() if log.exists() else ""


def stops(run_dir: Path) -> list[tuple[str, int]]:
    """(signal, step) of each stop of the run, from its log."""
    return [(name, int(step)) for name, step in STOPPED.findall(log_of(run_dir))]


def job_of(run_dir: Path) -> str:
    return json.loads((run_dir / sweep.STATE).read_text())["job_id"]


def job_state(job_id: str) -> str:
    return next((state for listed, state, _ in jobs() if listed == job_id), "")


def progress(run_dir: Path) -> int:
    """The run's last step in its log's progress lines (0 before the first)."""
    steps = re.findall(r"^step (\d+)/", log_of(run_dir), re.MULTILINE)
    return int(steps[-1]) if steps else 0


def wait_for_step(run_dir: Path, step: int, timeout_s: float = 180) -> None:
    wait_for(lambda: progress(run_dir) >= step, timeout_s, f"{run_dir} at step {step}")


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a / "agent.safetensors"), load_file(b / "agent.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def submitit_logs(sweep_dir: Path) -> str:
    return "".join(path.read_text() for path in sorted((sweep_dir / "submitit").rglob("*_log.err")))


def test_sbatch_refusing_an_unknown_partition_is_one_line_and_submits_nothing(cluster, tmp_path):
    before = jobs()
    done = run_sweep(tmp_path / "sweep", GAMES[:1], ["1"], TINY, "--partition", "gpu-nonexistent")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: sbatch refused the jobs, nothing was submitted: Batch job submission "
                                  "failed: Invalid partition name specified (check --partition")  # fmt: skip
    assert jobs() == before and not list((tmp_path / "sweep").rglob(sweep.STATE))


def test_a_failed_run_shows_its_last_log_line(cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    bad = [*TINY, "--imagine-context-length", "99"]  # longer than --sequence-length: the script refuses it
    assert run_sweep(sweep_dir, GAMES[:1], ["1"], bad).returncode == 0
    run_dir = sweep.run_folder(sweep_dir, "drama_xs.py", GAMES[0], 1)
    table = status_once(sweep_dir, "1 failed", 120)
    assert "1 runs: 0 done, 0 running, 0 pending, 1 failed, 0 cancelled" in table
    assert "error: --imagine-context-length 99 is longer than --sequence-length 8" in table.splitlines()[1]
    assert "Traceback" not in log_of(run_dir)


@pytest.mark.slow
def test_a_sweep_cancelled_with_scancel_resumes_then_finishes_then_submits_nothing(cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    flags = tiny(300, 50)
    first = run_sweep(sweep_dir, GAMES, ["1", "2"], flags)
    assert first.returncode == 0, first.stderr
    array = re.search(r"submitted 4 jobs as Slurm array (\d+)", first.stdout).group(1)
    runs = [sweep.run_folder(sweep_dir, "drama_xs.py", game, seed) for game in GAMES for seed in (1, 2)]
    wait_for(lambda: sum((run / "checkpoint.safetensors").exists() for run in runs) == 2, 180, "2 checkpoints")
    subprocess.run(["scancel", array], check=True)
    wait_for(lambda: all(state == "CANCELLED" for job, state, _ in jobs() if job.startswith(f"{array}_")), 60,
             "the cancelled array to end")  # fmt: skip
    table = status(sweep_dir)
    assert "4 runs: 0 done, 0 running, 0 pending, 0 failed, 4 cancelled" in table, table
    stopped = [line for line in table.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stopped) == 2 and all("re-run the same command to resume" in line for line in stopped), table

    again = run_sweep(sweep_dir, GAMES, ["1", "2"], flags)
    assert "4 to run (2 to start, 2 to resume), 0 done, 0 queued or running" in again.stdout, again.stdout
    wait_for(lambda: all((run / "eval_results.json").exists() for run in runs), 300, "the sweep to finish")
    assert sum(bool(RESUMED.search(log_of(run))) for run in runs) == 2
    table = status_once(sweep_dir, "4 done", 60)
    assert "4 runs: 4 done, 0 running, 0 pending, 0 failed, 0 cancelled" in table and "drama_xs     2     4" in table
    assert "Traceback" not in submitit_logs(sweep_dir)

    submitted = set((sweep_dir / "submitit").iterdir())
    finished = run_sweep(sweep_dir, GAMES, ["1", "2"], flags)
    assert finished.stdout.startswith("0 to run (0 to start, 0 to resume), 4 done, 0 queued or running\n")
    assert set((sweep_dir / "submitit").iterdir()) == submitted
    print(table)  # pytest -s shows the status table and the aggregate


@pytest.mark.slow
def test_a_preempted_job_resumes_from_the_signal_and_max_requeues_is_respected(cluster, tmp_path, reference):
    """Preemption as Slurm does it: SIGUSR2 to every process of the job (`scancel --signal=USR2`, submitit requeues
    it from its checkpoint()), and a bare `scontrol requeue` (SIGTERM, then Slurm requeues it). With a time limit
    of 10 minutes or less submitit counts every SIGUSR2 as a timeout, so `--max-requeues 1` allows one."""
    sweep_dir = tmp_path / "sweep"
    done = run_sweep(sweep_dir, GAMES[:1], ["1"], LONG, "--timeout-min", "3", "--max-requeues", "1")
    assert done.returncode == 0, done.stderr
    run_dir = sweep.run_folder(sweep_dir, "drama_xs.py", GAMES[0], 1)
    job = job_of(run_dir)
    wait_for_step(run_dir, 250)  # past the checkpoint at step 200

    stopped_at = []
    for n, interrupt in enumerate([["scancel", "--signal=USR2", job], ["scontrol", "requeue", job]], start=1):
        subprocess.run(interrupt, check=True)
        (name, step) = wait_for(lambda n=n: stops(run_dir)[n - 1 : n], 60, f"stop {n}")[0]
        assert name == ("SIGUSR2" if n == 1 else "SIGTERM")
        assert read_training_state(str(run_dir), "drama_xs").global_step == step  # saved at the signal's step
        wait_for(lambda n=n: RESUMED.findall(log_of(run_dir))[n - 1 : n], 120, f"resume {n}")
        assert RESUMED.findall(log_of(run_dir))[n - 1] == str(step)
        stopped_at.append(step)
        wait_for(lambda: "\nstep " in log_of(run_dir).rpartition("resuming ")[2], 60, "training after the resume")
        time.sleep(2)  # some steps (a progress line comes only every 10 s)
    assert "Submitted job triggered an exception" not in submitit_logs(sweep_dir)  # expected stops: no traceback

    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # a second timeout: more than --max-requeues 1
    wait_for(lambda: job_state(job) in ("FAILED", "COMPLETED", "CANCELLED"), 90, "the job to end, not requeued")
    assert "Job not requeued because: timed-out too many times" in submitit_logs(sweep_dir)
    (_, last) = stops(run_dir)[-1]
    table = status(sweep_dir)
    assert "1 runs: 0 done, 0 running, 0 pending, 1 failed, 0 cancelled" in table, table
    assert f"stopped by SIGUSR2 at step {last}/800" in table

    again = run_sweep(sweep_dir, GAMES[:1], ["1"], LONG, "--timeout-min", "3", "--max-requeues", "1")
    assert "1 to run (0 to start, 1 to resume)" in again.stdout, again.stderr
    wait_for(lambda: (run_dir / "eval_results.json").exists(), 180, "the resumed run to finish")
    assert RESUMED.findall(log_of(run_dir))[-1] == str(last)
    assert same_weights(run_dir, reference())
    print(f"stopped at steps {stopped_at + [last]} of 800 (checkpoints every 200), resumed there each time")


@pytest.mark.slow
def test_a_job_at_its_time_limit_resumes_from_the_signal_and_ends_as_an_uninterrupted_run(cluster, tmp_path):
    """--timeout-min 3: submitit's SIGUSR2 comes 90 s before the limit; the job saves at that step (not at its last
    checkpoint, every 1000 steps), is requeued and finishes with the weights of an uninterrupted run (after more
    requeues where the machine is slow: each resumes where the previous attempt stopped)."""
    flags = tiny(3000, 1000)
    straight = subprocess.Popen([sys.executable, str(ROOT / "drama_xs.py"), "--env-id", GAMES[1], "--seed", "1",
                                 *flags, "--run-dir", str(tmp_path / "straight")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    sweep_dir = tmp_path / "sweep"
    started = time.time()
    done = run_sweep(sweep_dir, GAMES[1:], ["1"], flags, "--timeout-min", "3", "--max-requeues", "3")
    assert done.returncode == 0, done.stderr
    run_dir = sweep.run_folder(sweep_dir, "drama_xs.py", GAMES[1], 1)
    (name, step) = wait_for(lambda: stops(run_dir), 200, "the time limit's signal")[0]
    signalled = time.time() - started
    assert name == "SIGUSR2" and 0 < step < 3000
    assert read_training_state(str(run_dir), "drama_xs").global_step == step
    wait_for(lambda: (run_dir / "eval_results.json").exists(), 420, "the requeued run to finish")
    finished = time.time() - started
    assert RESUMED.findall(log_of(run_dir)) == [str(step) for _, step in stops(run_dir)]
    assert {name for name, _ in stops(run_dir)} == {"SIGUSR2"}
    assert "this job is timed-out" in submitit_logs(sweep_dir)
    assert "Submitted job triggered an exception" not in submitit_logs(sweep_dir)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    assert same_weights(run_dir, tmp_path / "straight")
    print(
        f"time limit 3 min: SIGUSR2 {signalled:.0f} s after submission, the run stopped and saved at steps "
        f"{[step for _, step in stops(run_dir)]} of 3000 (checkpoints every 1000), requeued, finished "
        f"{finished:.0f} s after submission"
    )


@pytest.mark.slow
def test_a_job_whose_node_dies_resumes_from_its_last_checkpoint(cluster, tmp_path, reference):
    """slurmd and the job's processes are killed (a node crash); after SlurmdTimeout the node is down and the job
    is requeued (NODE_FAIL) or gone; slurmd starts again; the job, or a rerun of the same command, resumes from the
    last checkpoint and ends with the weights of an uninterrupted run."""
    sweep_dir = tmp_path / "sweep"
    done = run_sweep(sweep_dir, GAMES[:1], ["1"], LONG, "--timeout-min", "3")
    assert done.returncode == 0, done.stderr
    run_dir = sweep.run_folder(sweep_dir, "drama_xs.py", GAMES[0], 1)
    job = job_of(run_dir)
    wait_for_step(run_dir, 250)
    cluster.kill_slurmd()
    saved = read_training_state(str(run_dir), "drama_xs").global_step  # the last checkpoint before the crash
    assert not stops(run_dir) and saved % 200 == 0  # killed: nothing saved at the crash
    wait_for(lambda: cluster.node_state().startswith("down"), 60, "the node to be down")
    after = wait_for(lambda: (state := job_state(job)) not in ("RUNNING", "COMPLETING") and state, 60,
                     "Slurm to end or requeue the job")  # fmt: skip
    cluster.restart_slurmd()
    if after in ("PENDING", "REQUEUED"):
        wait_for(lambda: (run_dir / "eval_results.json").exists(), 180, "the requeued run to finish")
    else:
        assert " failed " in status(sweep_dir).splitlines()[1]
        again = run_sweep(sweep_dir, GAMES[:1], ["1"], LONG, "--timeout-min", "3")
        assert "1 to run (0 to start, 1 to resume)" in again.stdout, again.stderr
        wait_for(lambda: (run_dir / "eval_results.json").exists(), 180, "the resumed run to finish")
    assert RESUMED.findall(log_of(run_dir)) == [str(saved)]
    assert same_weights(run_dir, reference())
    print(f"node failure: the job was {after} when the node went down, resumed from step {saved}")
