"""What every drama_*.py script shares about running, not about the algorithm: the run's options (`RunOptions`,
which each script's `Args` extends with the paper's hyperparameters), its start (`start_run`), its folder (unique,
locked while a process trains in it: `run_folder`, `lock_run_folder`), the stop on a signal at a step boundary
(SIGINT, SIGTERM, Slurm's SIGUSR2: `StopOnSignal`, `stopped`) and `--resume` (`resume`: the saved run's settings and
its checkpoint).
"""

import atexit
import contextlib
import dataclasses
import itertools
import os
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

from utils import Interrupted, UserError, resolve_device
from utils.atari import check_env_id
from utils.checkpoint import CHECKPOINT, RUN_FILES, Checkpoint, read_training_state
from utils.checks import args_from_config, check_compiler, flag
from utils.compile_cache import compile_cache_folders
from utils.files import remove_stale_temporaries
from utils.precision import autocast, precision_of

LOCK = "run.lock"  # in a run folder while a process trains in it: "PID HOST"


@dataclass
class RunOptions:
    """How to run, log, save and evaluate (CleanRL's flags); the scripts' `Args` add the algorithm's settings."""

    seed: int = 1
    """seed of the experiment (python, numpy, torch and the environment)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to train: `auto` takes CUDA when available, else the CPU"""
    torch_threads: int = 0
    """CPU threads for torch (0: torch's default, one per physical core)"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """float format of the forward passes (bf16 autocast; weights, gradients and optimiser state stay fp32).
    `auto`: bf16 on CUDA; on a CPU bf16 where `torch.cpu.get_capabilities()` reports native bf16 (avx512_bf16,
    amx_bf16, Arm bf16: 2-3x faster updates), else fp32 (emulated bf16 is 7-14x slower). See utils/precision.py"""
    compile: bool = False
    """if toggled, `torch.compile` the imagination step (1.3x faster rollout on CPU after a one-time 5-20 s compile;
    on CUDA in CUDA graphs, mode "reduce-overhead"; needs a C++ compiler on CPU, e.g. `apt-get install g++`)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "drama"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to capture videos of the agent's training episodes (check out `videos` folder)"""
    save_model: bool = True
    """whether to save the agent (safetensors + args JSON) to the run folder"""
    upload_model: bool = False
    """whether to upload the saved agent to the Hugging Face Hub (needs `--save-model`)"""
    hf_entity: str = ""
    """the user or org name of the Hugging Face Hub model repository (default: your username)"""
    run_dir: str = ""
    """the run folder of a new run: TensorBoard logs, checkpoints, the agent, results (default: runs/<run_name>,
    with a suffix __2, __3, ... when it exists); locked while the run trains"""
    resume: str = ""
    """continue the run saved in this folder, in this folder (wherever it is); its settings are reused, and so are
    its total, `--torch-threads` and `--precision` unless this command line names them; `--device` and `--compile`
    come from this command line"""
    checkpoint_every: int = 10_000
    """write the full training state (for `--resume`) every this many env steps and at the end (0: only when
    stopped by Ctrl-C, SIGTERM or SIGUSR2); with the 100k-step replay buffer a checkpoint is about 1.3 GB"""
    eval_episodes: int = 100
    """episodes of the final evaluation (the paper's protocol: 100; 0 skips it)"""
    eval_greedy: bool = False
    """evaluate with the actor's most likely action instead of a sampled one"""
    log_every: int = 100
    """log losses to TensorBoard every this many updates"""
    dream_every: int = 5000
    """log a dream to TensorBoard (real | reconstructed | imagined video, imagination errors) every this many
    updates (0: never)"""


def start_run(
    args, saved: Checkpoint | None, triton_scan: bool = False
) -> tuple[str, str, torch.device, torch.autocast]:
    """Check the env id, the device and the compiler (for `--compile`, and on CUDA for a `triton_scan`: the fused
    Mamba-2 scan), then claim the run folder (unique and locked: made after every check), set the compile cache
    folders (`compile_cache_folders`), the CPU threads and the precision (printed, with why).
    `saved`: the checkpoint of a `--resume` run, else None. Returns (run name, run folder, device, autocast)."""
    check_env_id(args.env_id)
    run_name = saved.run_name if saved else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device = resolve_device(args.device)
    check_compiler(device, args.compile, triton_scan)
    run_dir, run_name = run_folder(args, run_name)
    compile_cache_folders()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    precision, why = precision_of(args.precision, device)
    print(f"precision {precision} ({why})", flush=True)
    return run_name, run_dir, device, autocast(device, precision)


def resume(args, variant: str) -> tuple[object, Checkpoint | None]:
    """`--resume FOLDER`: lock the folder (first: a second process on it stops here, naming the one that trains in
    it), read its checkpoint and take the saved run's settings (`resume_args`). Returns (args, the checkpoint), or
    (args, None) for a new run."""
    if not args.resume:
        return args, None
    lock_run_folder(args.resume)
    saved = read_training_state(args.resume, variant)
    return resume_args(args, saved), saved


# decided by the command line of a resumed run, not by the saved run (where it runs)
FROM_COMMAND_LINE = ("resume", "device", "compile")
# the saved run's, unless the command line of a resumed run names them (how it computes: a CPU run is bit for bit
# the same only with the same threads and precision)
KEPT_UNLESS_GIVEN = ("total_timesteps", "torch_threads", "precision")


def resume_args(args, saved: Checkpoint):
    """The saved run's Args (each field's type checked), with what this command line decides (`FROM_COMMAND_LINE`,
    and each of `KEPT_UNLESS_GIVEN` it names); prints the threads and precision it resumes with, and whose they are.
    A total below the step the run stopped at is refused."""
    own = args_from_config(type(args), saved.args, os.path.join(args.resume, CHECKPOINT))
    given = [name for name in KEPT_UNLESS_GIVEN if given_on_command_line(name)]
    resumed = dataclasses.replace(own, **{k: getattr(args, k) for k in (*FROM_COMMAND_LINE, *given)},
                                  run_dir=args.resume)  # fmt: skip
    if resumed.total_timesteps < saved.global_step:
        raise UserError(f"--total-timesteps {resumed.total_timesteps} < step {saved.global_step}, where {args.resume} "
                        f"stopped: give >= {saved.global_step}")  # fmt: skip
    settings = [f"{flag(k)} {getattr(resumed, k)} ({'this command line' if k in given else 'the run'}'s)"
                for k in ("torch_threads", "precision")]  # fmt: skip
    print(f"resuming with {' and '.join(settings)}", flush=True)
    return resumed


def given_on_command_line(field: str) -> bool:
    """Whether the flag of this Args field is on the command line (tyro takes `--a-b`, `--a_b` and `--a-b=1`)."""
    flags = {"--" + field, "--" + field.replace("_", "-")}
    return any(arg.split("=")[0] in flags for arg in sys.argv[1:])


def run_folder(args, run_name: str) -> tuple[str, str]:
    """Claim and lock the folder of the run's logs, checkpoints and agent; returns (folder, run name).

    `--resume DIR`: DIR. `--run-dir DIR`: DIR, refused when it already holds a run. Otherwise runs/<run_name>, made
    here; when it exists (two runs started in the same second) runs/<run_name>__2, __3, ..., and the run name
    takes the suffix too (TensorBoard, videos). The folder stays locked while this process runs (`lock_run_folder`).
    """
    if args.resume:
        lock_run_folder(args.resume)
        return args.resume, run_name
    if args.run_dir:
        os.makedirs(args.run_dir, exist_ok=True)
        lock_run_folder(args.run_dir)
        if any(os.path.exists(os.path.join(args.run_dir, f)) for f in ("args.json", CHECKPOINT)):
            raise UserError(f"{args.run_dir} already holds a run: continue it with --resume {args.run_dir} or pick "
                            "another --run-dir")  # fmt: skip
        return args.run_dir, run_name
    os.makedirs(os.path.dirname(os.path.join("runs", run_name)), exist_ok=True)
    for n in itertools.count(1):
        name = run_name if n == 1 else f"{run_name}__{n}"
        try:
            os.mkdir(os.path.join("runs", name))  # atomic: of two runs making one folder, one gets FileExistsError
        except FileExistsError:
            continue
        lock_run_folder(os.path.join("runs", name))
        return os.path.join("runs", name), name
    raise AssertionError("unreachable")


_locks: dict[str, int] = {}  # run folder (real path) -> the file descriptor of its lock, held by this process


def lock_run_folder(run_dir: str) -> None:
    """Hold `run_dir/run.lock` until this process ends: an flock on it, and "PID HOST" in it for the message of a
    second process on the folder (a new run with the same --run-dir, another --resume), which fails with one line.
    The kernel drops the flock of a dead process, so the lock file a killed run left is taken over (with a note).
    Once the lock is held, the temporary files killed saves left are removed, safetensors' own included (no other
    process writes there). Holding it again is a no-op; without fcntl (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        return
    key = os.path.realpath(run_dir)
    if key in _locks:
        return
    if not os.path.isdir(run_dir):
        raise UserError(f"no run folder at {run_dir}: pass --resume runs/<run_name> of a run saved with "
                        "--checkpoint-every")  # fmt: skip
    path = os.path.join(run_dir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, host = os.read(fd, 200).decode(errors="replace").strip().partition(" ")
            os.close(fd)
            raise UserError(
                f"{run_dir} is in use by process {pid or '?'} on {host or 'this machine'} (it holds {path}): wait "
                f"for it to end or stop it (kill {pid or 'PID'}), or use another folder"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # its holder removed the file between our open and flock: lock the new one
    previous = os.read(fd, 200).decode(errors="replace").strip()
    if previous:
        print(f"took over {path} of process {previous}, which is no longer running", flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _locks[key] = fd
    remove_stale_temporaries(run_dir, RUN_FILES, owned=True)
    atexit.register(_unlock, key, path)


def _unlock(key: str, path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)  # while still holding it: a process that opened it meanwhile retries on the new file
    os.close(_locks.pop(key))


class StopOnSignal:
    """From its creation until `restore()`, a first SIGINT (Ctrl-C), SIGTERM or SIGUSR2 only sets `.signal`: the
    training loop stops at its next step boundary and saves. SIGUSR2 is Slurm's warning before a time limit or a
    preemption (submitit asks for it, `--signal=USR2@90`): Slurm sends it to every process of the job, and
    submitit's `checkpoint()` may send it again, so a SIGUSR2 while already stopping is ignored. A second SIGINT or
    SIGTERM aborts at once (`Interrupted`; the files being written stay whole, see `utils.files.atomic_write`).
    `restore()` puts the previous handlers back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            if signum == signal.SIGUSR2:
                return
            raise Interrupted(f"{name} again: aborted at once, without saving (the last checkpoint stays)", signum)
        self.signal = signum
        again = "" if signum == signal.SIGUSR2 else " (again: abort at once)"
        os.write(2, f"\n{name}: stopping after this step to save the run{again}\n".encode())


def stopped(signum: int, step: int, total: int, run_dir: str, variant: str, agent_path: str | None) -> Interrupted:
    """The exception ending a run stopped by `signum` after its state was saved: where it is and how to resume."""
    agent = f", the agent in {agent_path}" if agent_path else ""
    return Interrupted(
        f"stopped by {signal.Signals(signum).name} at step {step}/{total}: the training state is in "
        f"{os.path.join(run_dir, CHECKPOINT)}{agent}; continue with: python {variant}.py --resume "
        f"{shlex.quote(run_dir)}",
        signum,
    )
