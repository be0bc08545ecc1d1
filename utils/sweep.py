"""Run a sweep (scripts x games x seeds) with submitit on a Slurm cluster or on this machine; resume it exactly.

    python -m utils.sweep run sweeps/table1 --seeds 1 2 3 4 5 --executor slurm --partition gpu \\
        --timeout-min 720 --gpus-per-task 1 --cpus-per-task 8 -- --checkpoint-every 5000
    python -m utils.sweep status sweeps/table1

Each (script, game, seed) is one job training in its own folder `<sweep>/<script>/<Game>/seed<seed>`. Running the
same command again skips finished runs (their eval_results.json exists), leaves alone runs that are still queued or
running, resumes runs that have a checkpoint (`--resume`) and starts the rest. A job that Slurm preempts or times
out gets SIGUSR2 90 s before (submitit's `--signal=USR2@90`): the training script stops at its step boundary and
saves, and submitit (its `checkpoint()`) requeues the job, which continues with `--resume` from that step. On a
real Slurm cluster: docs/slurm.md; a single-node one on this machine: `python -m utils.slurm_local`.
"""

import argparse
import contextlib
import csv
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit

from utils import UserError, command_parser, game_of, run_cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("drama_xs.py", "drama_s.py", "drama_mamba1.py", "drama_uniform_sampling.py")
STATE = "sweep_job.json"  # in each run folder: what the job last reported (submitted, running, failed)
LOG = "train.log"  # in each run folder: the training script's stdout and stderr, every attempt appended


def atari100k_env_ids() -> list[str]:
    """The 26 games of the paper's Table 1, as `ALE/<Game>-v5` ids."""
    with open(Path(__file__).with_name("atari100k_scores.csv"), newline="") as f:
        return [f"ALE/{row['game']}-v5" for row in csv.DictReader(f)]


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


RUNTIME_FLAGS = {"--device", "--compile", "--no-compile", "--torch-threads"}  # see `Args.resume` in the scripts
# exit codes of a script that stopped on SIGINT, SIGTERM or SIGUSR2 after saving its state (`utils.Interrupted`)
STOPPED_CODES = {128 + signum for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
STOP_WAIT_S = 60  # how long checkpoint() waits for the script to save (Slurm's warning comes 90 s before the kill)
SIGNAL_LEAD_S = 90  # submitit's default `signal_delay_s`: SIGUSR2 comes this long before the time limit


class TrainingJob(submitit.helpers.Checkpointable):
    """One run of a training script in its own folder: starts it, or resumes it when it has a checkpoint.

    On preemption or timeout Slurm sends SIGUSR2 to every process of the job, the script included, and submitit
    calls `checkpoint()`: it sends SIGUSR2 again (for a signal that reached only submitit; the script ignores a
    second one), waits until the script has saved its state at the end of its step (killed after `STOP_WAIT_S`, its
    last checkpoint stays) and hands submitit this same job to requeue, which then resumes from that step. A script
    stopped by a signal (scancel's SIGTERM, a SIGUSR2 that reached only it) ends the job as "stopped", not as a
    crash: re-running the sweep resumes it.
    """

    def __init__(self, script: str, env_id: str, seed: int, flags: list[str], run_dir: str):
        self.script, self.env_id, self.seed, self.flags, self.run_dir = script, env_id, seed, list(flags), run_dir
        self._process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        run_dir = Path(self.run_dir)
        if (run_dir / "checkpoint.safetensors").exists():
            return [sys.executable, str(ROOT / self.script), "--resume", self.run_dir, *self.runtime_flags()]
        flags = ["--env-id", self.env_id, "--seed", str(self.seed), *self.flags, "--run-dir", self.run_dir]
        return [sys.executable, str(ROOT / self.script), *flags]

    def runtime_flags(self) -> list[str]:
        """Where and how the run runs, given again when it resumes: `--device` and `--compile` come from a resumed
        run's command line, not from its checkpoint (its `--torch-threads` is kept anyway: giving it again is the
        same)."""
        kept, flags = [], iter(self.flags)
        for flag in flags:
            name = flag.split("=")[0]
            if name in RUNTIME_FLAGS:
                kept.append(flag)
                if "=" not in flag and name not in ("--compile", "--no-compile"):
                    kept.append(next(flags, ""))
        return kept

    def report(self, state: str, **details) -> None:
        """Record the run's state for `status` (the job's own executor and id unless given)."""
        if "job_id" not in details:
            environment = submitit.JobEnvironment()
            details |= {"executor": environment.cluster, "job_id": environment.job_id}
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(self.run_dir) / STATE, {"state": state, "host": socket.gethostname(), **details})

    def __call__(self) -> dict:
        run_dir = Path(self.run_dir)
        if (run_dir / "eval_results.json").exists():
            return json.loads((run_dir / "eval_results.json").read_text())
        run_dir.mkdir(parents=True, exist_ok=True)
        command = self.command()
        if "--resume" not in command:  # what a killed attempt left before its first checkpoint
            for path in run_dir.iterdir():
                if path.name not in (LOG, STATE):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        with open(run_dir / LOG, "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir)
        try:
            self.report("running", train_pid=self._process.pid)
            while self._process.poll() is None:  # not wait(): checkpoint() waits on it from a signal handler
                time.sleep(0.5)
            returncode = self._process.returncode
        finally:
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
        if returncode in STOPPED_CODES:  # stopped on a signal after saving: not a crash, nothing to trace back
            self.report("stopped", error=last_line(run_dir / LOG))
            return {}
        if returncode != 0:
            killed = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else ""
            error = killed or last_line(run_dir / LOG)
            self.report("failed", error=error)
            raise RuntimeError(f"{self.run_dir}: {error}")
        if not (run_dir / "eval_results.json").exists():
            error = "finished without eval_results.json: give --eval-episodes > 0"
            self.report("failed", error=error)
            raise RuntimeError(f"{self.run_dir}: {error}")
        self.report("done")
        return json.loads((run_dir / "eval_results.json").read_text())

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGUSR2)  # stop at the end of the step and save (ignored if stopping)
            try:
                self._process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._process = None  # a Popen cannot be pickled into the requeued job
        self.report("requeued")
        return super().checkpoint()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process": None}


# --------------------------------------------------------------------------------------------------
# The sweep: its jobs, its folder, the state of each run
# --------------------------------------------------------------------------------------------------
def check_sweep(scripts: list[str], env_ids: list[str], seeds: list[int]) -> tuple[list[str], list[str]]:
    """Normalise and check the sweep's definition: (scripts with .py, env ids). One-line errors name the fix."""
    from utils.atari import check_env_id  # imports ALE: not needed by the jobs themselves
    scripts = [s if s.endswith(".py") else s + ".py" for s in scripts]
    for script in scripts:
        if os.path.basename(script) not in SCRIPTS or os.path.dirname(script):
            raise UserError(f"unknown script '{script}': pick from {', '.join(SCRIPTS)}")
    env_ids = [e if "/" in e or e.endswith(("-v4", "-v5")) else f"ALE/{e}-v5" for e in env_ids]  # Pong: ALE/Pong-v5
    for env_id in env_ids:
        check_env_id(env_id)
    if not seeds:
        raise UserError("--seeds is empty: give one or more seeds, e.g. --seeds 1 2 3 4 5")
    if not scripts or not env_ids:
        raise UserError("--scripts and --env-ids need at least one value each (leave --env-ids out for all 26 games)")
    return scripts, env_ids


def run_folder(sweep_dir: Path, script: str, env_id: str, seed: int) -> Path:
    return sweep_dir / script[: -len(".py")] / game_of(env_id) / f"seed{seed}"


def make_jobs(sweep_dir: Path, definition: dict) -> list[TrainingJob]:
    return [
        TrainingJob(script, env_id, seed, definition["flags"], str(run_folder(sweep_dir, script, env_id, seed)))
        for script in definition["scripts"]
        for env_id in definition["env_ids"]
        for seed in definition["seeds"]
    ]


def read_definition(sweep_dir: Path) -> dict:
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        raise UserError(f"{sweep_dir} is not a sweep folder (no sweep.json): pass the folder given to utils.sweep run")
    return json.loads(path.read_text())


def record_definition(sweep_dir: Path, definition: dict, command: str) -> None:
    """Write sweep.json on the first run; later runs must define the same jobs (executor options may change)."""
    path = sweep_dir / "sweep.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if {k: recorded.get(k) for k in definition} != definition:
            raise UserError(
                f"{sweep_dir} holds a sweep made by another command ({recorded['command']}): "
                "re-run that command, or give another sweep folder"
            )
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, {**definition, "command": command})


def alive(state: dict) -> bool:
    """Whether the job that wrote this state is still queued or running, as far as this machine can tell."""
    if state["executor"] == "local":  # its job id is the pid of submitit's controller, alive across requeues
        if state["host"] != socket.gethostname():
            return True  # another machine's process: trust its report
        try:
            os.kill(int(state["job_id"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    if shutil.which("squeue") is None:
        return True  # a Slurm job seen from a machine without squeue: trust its report
    queued = subprocess.run(["squeue", "-h", "-j", str(state["job_id"])], capture_output=True, text=True)
    return queued.returncode == 0 and bool(queued.stdout.strip())


def slurm_state(job_id: str) -> str:
    """A Slurm job's state (COMPLETED, CANCELLED, TIMEOUT, NODE_FAIL, ...): from sacct where accounting is on, else
    from squeue, which knows an ended job for `MinJobAge` (300 s by default); '' when neither knows it."""
    for command in (["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], ["squeue", "-h", "-t", "all", "-j",
                                                                               job_id, "-o", "%T"]):  # fmt: skip
        if shutil.which(command[0]) is not None:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.split():
                return done.stdout.split()[0]  # "CANCELLED by 0": CANCELLED
    return ""


def run_state(run_dir: Path) -> tuple[str, str]:
    """(done | running | pending | failed | cancelled, detail) of one run folder."""
    if (run_dir / "eval_results.json").exists():
        result = json.loads((run_dir / "eval_results.json").read_text())
        return "done", f"mean return {result['mean']:.1f} over {len(result.get('returns', []))} episodes"
    if not (run_dir / STATE).exists():
        return "pending", "not submitted"
    state = json.loads((run_dir / STATE).read_text())
    job = f"job {state.get('job_id')}"
    if state["state"] in ("failed", "done"):  # done without eval_results.json: it was deleted
        return "failed", f"{state.get('error', 'eval_results.json is gone')} ({job}, log: {run_dir / LOG})"
    log = last_line(run_dir / LOG) if (run_dir / LOG).exists() else "never started"
    if alive(state):
        if state["state"] == "running":
            return "running", f"{job} on {state['host']}"
        return "pending", f"{job} {state['state']}"  # submitted, or requeued (and stopped, then requeued by Slurm)
    ended = slurm_state(str(state["job_id"])) if state["executor"] == "slurm" else ""
    if state["state"] == "stopped" or ended.startswith("CANCELLED"):
        return "cancelled", f"{job} {ended or 'stopped'}: {log}; re-run the same command to resume"
    ended = f" ({ended})" if ended else ""
    return "failed", f"{job}{ended} is gone without a result: {log} (log: {run_dir / LOG})"


def print_status(sweep_dir: Path, definition: dict) -> dict[str, int]:
    rows = [(Path(job.run_dir), *run_state(Path(job.run_dir))) for job in make_jobs(sweep_dir, definition)]
    width = max(len(str(run_dir.relative_to(sweep_dir))) for run_dir, _, _ in rows)
    print(f"{'run':<{width}}  {'state':<8} detail")
    for run_dir, state, detail in rows:
        print(f"{str(run_dir.relative_to(sweep_dir)):<{width}}  {state:<8} {detail}")
    states = ("done", "running", "pending", "failed", "cancelled")
    counts = {state: sum(row[1] == state for row in rows) for state in states}
    print(f"{len(rows)} runs: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return counts


def status(sweep_dir: Path) -> None:
    counts = print_status(sweep_dir, read_definition(sweep_dir))
    if counts["done"] == sum(counts.values()):
        aggregate(sweep_dir)


def aggregate(sweep_dir: Path) -> None:
    """`python -m utils.evaluate aggregate <sweep> --out <sweep>/aggregate`."""
    from utils.evaluate import run_aggregate

    print()
    run_aggregate([str(sweep_dir)], str(sweep_dir / "aggregate"))


# --------------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------------
def slurm_parameters(args: argparse.Namespace, sweep_dir: Path) -> dict:
    """submitit's SlurmExecutor parameters (its own names) from the command line."""
    parameters = dict(
        job_name=f"sweep-{sweep_dir.name}", partition=args.partition, time=args.timeout_min, account=args.account,
        gpus_per_task=args.gpus_per_task or None, cpus_per_task=args.cpus_per_task, array_parallelism=args.parallel,
        mem=f"{args.mem_gb}GB" if args.mem_gb else None, setup=args.setup or None,
    )  # fmt: skip
    return {k: v for k, v in parameters.items() if v is not None}


def sbatch_script(sweep_dir: Path, parameters: dict, count: int) -> str:
    """The sbatch script submitit submits for an array of `count` jobs (rendered without Slurm)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = sweep_dir / "submitit" / "%j"
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=count, **parameters)


NO_SLURM = "run it on the cluster's login node, or use --executor local"


def check_slurm_commands() -> None:
    """srun on the PATH (submitit's SlurmExecutor needs it; sbatch is checked when it submits), or one line."""
    if shutil.which("srun") is None:
        raise UserError(f"--executor slurm needs Slurm's sbatch and srun on the PATH (no srun here): {NO_SLURM}")


def submit_slurm(jobs: list[TrainingJob], args: argparse.Namespace, sweep_dir: Path) -> None:
    """Submit the jobs as one Slurm array; sbatch's refusal (an unknown partition or account, ...) is one line."""
    executor = submitit.SlurmExecutor(folder=sweep_dir / "submitit" / "%j", max_num_timeout=args.max_requeues)
    executor.update_parameters(**slurm_parameters(args, sweep_dir))
    try:
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():  # submitit prints sbatch's stderr too
            submitted = [executor.submit(job) for job in jobs]
    except FileNotFoundError as error:  # sbatch
        raise UserError(f"--executor slurm needs Slurm's sbatch on the PATH (no {error.filename} here): "
                        f"{NO_SLURM}") from None  # fmt: skip
    except submitit.core.utils.FailedJobError as error:
        raise UserError(f"sbatch refused the jobs, nothing was submitted: {last_error(str(error))} (check "
                        "--partition and --account: `sinfo` lists the partitions, `sacctmgr show assoc "
                        "user=$USER` your accounts)") from None  # fmt: skip
    for job, handle in zip(jobs, submitted, strict=True):
        job.report("submitted", executor="slurm", job_id=handle.job_id)
    print(f"submitted {len(jobs)} jobs as Slurm array {submitted[0].job_id.split('_')[0]}")
    print(f"follow them with: python -m utils.sweep status {sweep_dir}")


def last_error(text: str) -> str:
    """The last line of a command's error output, without its `sbatch: error: ` prefix."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or ["(no message)"]
    return lines[-1].removeprefix("sbatch: error: ")


def run_local(jobs: list[TrainingJob], args: argparse.Namespace, sweep_dir: Path) -> None:
    """Run the jobs on this machine, `--parallel` at a time, until all have ended."""
    executor = submitit.LocalExecutor(folder=sweep_dir / "submitit" / "%j", max_num_timeout=args.max_requeues)
    executor.update_parameters(timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_task, setup=args.setup or ())
    queue, running, failed = list(jobs), [], []
    while queue or running:
        while queue and len(running) < args.parallel:
            job = queue.pop(0)
            running.append((job, executor.submit(job)))
            print(f"started {job.run_dir}", flush=True)
        time.sleep(1)
        for job, handle in [r for r in running if r[1].done()]:
            running.remove((job, handle))
            state, detail = run_state(Path(job.run_dir))
            failed += [job] if state != "done" else []
            print(f"{state} {job.run_dir}: {detail}", flush=True)
    print()
    counts = print_status(sweep_dir, read_definition(sweep_dir))
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} runs failed: re-run the same command to resume them")
    if counts["done"] == sum(counts.values()):
        aggregate(sweep_dir)


def check_options(args: argparse.Namespace) -> None:
    """The executor's options, before anything is written or submitted. On Slurm the time limit must leave room for
    submitit's SIGUSR2, `SIGNAL_LEAD_S` before it, and for the script to start, finish its step and save: a limit
    under 3 minutes is refused at once (Slurm 22.05 rounds a limit to whole minutes and signals at the start of a
    2-minute job). No check against --checkpoint-every: a time limit or a preemption saves the run at the signal,
    so the checkpoint interval only bounds what a crash (a node failure, a kill) loses."""
    if args.parallel < 1 or args.timeout_min < 1 or args.max_requeues < 0:
        raise UserError("--parallel and --timeout-min must be >= 1, --max-requeues >= 0")
    if args.executor == "slurm" and args.timeout_min < 3:
        raise UserError(f"--timeout-min {args.timeout_min} is too short for Slurm: the job gets SIGUSR2 (stop and "
                        f"save) {SIGNAL_LEAD_S} s before its time limit, and needs time to start and save first: give "
                        "--timeout-min 3 or more")  # fmt: skip
    if args.executor == "slurm" and not args.dry_run:
        check_slurm_commands()


def run(args: argparse.Namespace, flags: list[str], command: str) -> None:
    check_options(args)
    scripts, env_ids = check_sweep(args.scripts, args.env_ids, args.seeds)
    definition = {"scripts": scripts, "env_ids": env_ids, "seeds": args.seeds, "flags": flags}
    sweep_dir = Path(args.sweep_dir).resolve()
    if (sweep_dir / "sweep.json").is_file() or not args.dry_run:
        record_definition(sweep_dir, definition, command)
    jobs, counts = [], {"done": 0, "running": 0, "resume": 0, "start": 0}
    for job in make_jobs(sweep_dir, definition):
        state, _ = run_state(Path(job.run_dir))
        # pending with a state file: submitted or requeued, and still in the queue
        if state in ("done", "running") or (state == "pending" and (Path(job.run_dir) / STATE).exists()):
            counts["done" if state == "done" else "running"] += 1
            continue
        action = "resume" if "--resume" in job.command() else "start"
        counts[action] += 1
        jobs.append(job)
        if args.dry_run:
            print(f"{action:<6} {shlex.join(job.command())}")
    print(
        f"{len(jobs)} to run ({counts['start']} to start, {counts['resume']} to resume), "
        f"{counts['done']} done, {counts['running']} queued or running"
    )
    if args.dry_run:
        if args.executor == "slurm" and jobs:
            print("\n" + sbatch_script(sweep_dir, slurm_parameters(args, sweep_dir), len(jobs)))
        return
    if not jobs:
        if counts["done"] == len(make_jobs(sweep_dir, definition)):
            aggregate(sweep_dir)
        return
    (submit_slurm if args.executor == "slurm" else run_local)(jobs, args, sweep_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "utils.sweep", *argv])
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser, commands = command_parser(
        "python -m utils.sweep", "Train scripts x games x seeds with submitit (Slurm or this machine), resuming exactly"
    )
    go = commands.add_parser(
        "run",
        help="submit (slurm) or run (local) every run of the sweep that has not finished",
        description="Training flags after `--` go to every run, e.g. `-- --checkpoint-every 5000 --eval-episodes 100`.",
    )
    go.add_argument("sweep_dir", help="the sweep folder: one run folder per job, sweep.json, submitit logs")
    go.add_argument("--scripts", nargs="+", default=["drama_xs.py"], help=f"any of {', '.join(SCRIPTS)}")
    go.add_argument("--env-ids", nargs="*", default=atari100k_env_ids(), help="default: the 26 Atari100k games")
    go.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3, 4, 5], help="default: %(default)s")
    go.add_argument("--executor", choices=["slurm", "local"], default="local", help="default: %(default)s")
    go.add_argument("--dry-run", action="store_true", help="print the jobs (and the sbatch script) and submit nothing")
    go.add_argument(
        "--parallel", type=int, default=1,
        help="runs at once: local processes, or the Slurm array's throttle (%%N) (default: %(default)s)",
    )  # fmt: skip
    go.add_argument(
        "--timeout-min", type=int, default=24 * 60,
        help="time limit of a job in minutes; a job that reaches it is requeued and resumes (default: %(default)s)",
    )  # fmt: skip
    go.add_argument("--max-requeues", type=int, default=30, help="timeouts a run may be requeued after (default: 30)")
    go.add_argument("--setup", action="append", help="a shell line run before each job (repeatable), e.g. module load")
    slurm = go.add_argument_group("slurm (submitit's SlurmExecutor parameters)")
    slurm.add_argument("--partition", help="the Slurm partition")
    slurm.add_argument("--account", help="the Slurm account to charge")
    slurm.add_argument("--gpus-per-task", type=int, default=1, help="default: %(default)s (0: CPU jobs)")
    slurm.add_argument("--cpus-per-task", type=int, default=8, help="default: %(default)s")
    slurm.add_argument("--mem-gb", type=int, default=0, help="memory per job in GB (default: the partition's)")
    show = commands.add_parser("status", help="done / running / pending / failed runs; the aggregate when all are done")
    show.add_argument("sweep_dir", help="the sweep folder given to `run`")
    args = parser.parse_args(argv)

    def command_fn():
        if args.command == "status":
            return status(Path(args.sweep_dir).resolve())
        return run(args, flags, command)

    return run_cli(command_fn)


if __name__ == "__main__":
    sys.exit(main())
