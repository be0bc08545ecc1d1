"""Saving a run: the agent (`agent.safetensors` + `args.json`, read back by `utils.hub.load_agent`) and the full
training state (`checkpoint.safetensors`, read back by `--resume`), each written atomically with the sha256 of
its tensors (`atomic_save`, `verify_checksum`); the run folder, unique and locked while a process trains in it
(`run_folder`, `lock_run_folder`); the stop on Ctrl-C or SIGTERM at a step boundary (`StopOnSignal`).

The training state is handed over as a dict name -> value and saved by the value's kind, so that every drama_*.py
script shares this code and none changes when it does:

    nn.Module             tensors  "{name}.{key}" (its state dict)
    torch Optimizer       tensors  "{name}.{i}.{key}" (the i-th parameter's state; `step` is kept on the CPU)
    LR scheduler          progress[name] (its state dict)
    np.random.Generator   progress[name] (its bit generator's state)
    "window" (the agent)  tensors  "window.{i}.z", "window.{i}.actions" (its acting windows: Agent.window_state)
    replay buffer         tensors  "{name}.{array}" (its arrays up to `size`), progress[name] {next, size}
                                   (ReplayBuffer.state_dict)
    list of ints          tensor   name (int64; the actions taken so far, to replay the env)
    deque                 progress[name] (floats, e.g. the recent returns)
    dataclass             progress[name] (its fields; the run's Args)
    int, float, bool, str progress[name] (the loop's counters)

with the metadata {"variant", "action_dim", "progress": JSON, "sha256"}, and torch's CPU generator ("torch_rng")
and, on a GPU, the CUDA one ("cuda_rng"). `restore_training_state` puts the saved values back into the objects of
the same dict and returns the plain values.
"""

import atexit
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable

import numpy as np
import torch

from utils import Interrupted, UserError
from utils.checks import check_config

AGENT, CHECKPOINT = "agent.safetensors", "checkpoint.safetensors"
CHECKSUM = "sha256"  # the metadata key of the tensors' checksum, in every safetensors file written here
TEMPORARY = ".tmp"  # a file is written to path + TEMPORARY, then renamed
LOCK = "run.lock"  # in a run folder while a process trains in it: "PID HOST"


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (about 1 s per GB on one core)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


_unverified: set[str] = set()  # files without a checksum this process already warned about


def verify_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> None:
    """Check the tensors read from the safetensors file `path` against the checksum saved in its metadata: a
    mismatch is a one-line UserError naming the file; a file written before checksums existed gets one warning."""
    if CHECKSUM not in metadata:
        if str(path) not in _unverified:
            _unverified.add(str(path))
            print(f"warning: {path} has no checksum (written before checksums were added): its tensors are not "
                  "verified; saving it again adds one", file=sys.stderr)  # fmt: skip
        return
    if tensor_checksum(tensors) != metadata[CHECKSUM]:
        raise UserError(
            f"{path} is corrupted: its tensors do not match the sha256 saved with them; restore it from a copy, "
            "download it again or train anew"
        )


def remove_stale_temporaries(folder: str) -> None:
    """Remove the temporary files a killed save left in `folder` (a save of the full state leaves up to 1.3 GB)."""
    for name in (AGENT, "args.json", CHECKPOINT):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name + TEMPORARY))


def atomic_write(path: str, write: Callable[[str], None], size: int) -> None:
    """`write(temporary)`, flush it to disk, then rename it to `path`: a crash mid-write leaves the old file intact.

    The folder's stale temporary files go first (their space may be needed); the temporary file is removed on
    every failure; a full disk or another OSError is a one-line UserError naming the path and the space needed
    (`size`, the bytes to write)."""
    from safetensors import SafetensorError

    folder, temporary = os.path.dirname(path) or ".", path + TEMPORARY
    try:
        remove_stale_temporaries(folder)
        write(temporary)
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if not isinstance(error, (OSError, SafetensorError)):
            raise
        reason = " ".join(str(error).split())  # one line
        try:
            free = f"{shutil.disk_usage(folder).free / 1e6:,.1f} MB are free there"
        except OSError:
            free = "the free space there is unknown"
        kept = f"the previous {os.path.basename(path)} is untouched" if os.path.exists(path) else "nothing was written"
        raise UserError(
            f"could not write {path} ({reason}): it needs about {size / 1e6:,.1f} MB and {free}; {kept}; free some "
            "space, then --resume from the last checkpoint written, if any"
        ) from None


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (`atomic_write`), with the checksum of its tensors in its metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {**metadata, CHECKSUM: tensor_checksum(tensors)}
    size = sum(v.numel() * v.element_size() for v in tensors.values()) + len(json.dumps(metadata)) + 100 * len(tensors)
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata), size)


def save_agent(agent: torch.nn.Module, args, run_dir: str, variant: str) -> str:
    """Write `agent.safetensors` (weights and normaliser statistics) and `args.json`, each atomically."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, AGENT)
    metadata = {"variant": variant, "action_dim": str(agent.action_dim), "env_id": args.env_id}
    atomic_save(agent.state_dict(), path, metadata)
    config = json.dumps({**dataclasses.asdict(args), "variant": variant, "action_dim": agent.action_dim}, indent=2)

    def write(temporary: str) -> None:
        with open(temporary, "w") as f:
            f.write(config)

    atomic_write(os.path.join(run_dir, "args.json"), write, len(config))
    print(f"agent saved to {path}")
    return path


def optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {f"{prefix}.{i}.{k}": v for i, p in enumerate(params) for k, v in optimizer.state.get(p, {}).items()}


def load_optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, index, name = key.rsplit(".", 2)
            param = params[int(index)]
            on_cpu = value.dim() == 0  # LaProp's scalars (step, lr_avg) stay CPU tensors: no sync per parameter
            optimizer.state[param][name] = value if on_cpu else value.to(param.device)


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's generators a run draws from: the CPU's, and the GPU's when it trains on one (latents, actions)."""
    tensors = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda_rng"] = torch.cuda.get_rng_state(device)
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Set the generators `rng_tensors` saved; a CUDA state is skipped on a CPU (and absent from a CPU run)."""
    torch.set_rng_state(tensors["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in tensors:
        torch.cuda.set_rng_state(tensors["cuda_rng"], device)


def _device(state: dict) -> torch.device:
    module = next(v for v in state.values() if isinstance(v, torch.nn.Module))
    return next(module.parameters()).device


def save_training_state(run_dir: str, state: dict, variant: str) -> None:
    """Everything a run needs to continue exactly (see the module's docstring), to `run_dir/checkpoint.safetensors`."""
    tensors, progress = rng_tensors(_device(state)), {}
    for name, value in state.items():
        if name == "window":
            tensors |= {f"window.{k}": v for k, v in value.window_state().items()}
        elif isinstance(value, torch.nn.Module):
            tensors |= {f"{name}.{k}": v for k, v in value.state_dict().items()}
        elif isinstance(value, torch.optim.Optimizer):
            tensors |= optimizer_tensors(name, value)
        elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
            progress[name] = value.state_dict()
        elif isinstance(value, np.random.Generator):
            progress[name] = value.bit_generator.state
        elif hasattr(value, "load_state_dict"):  # the replay buffer
            buffer_state = value.state_dict()
            tensors |= {f"{name}.{k}": v for k, v in buffer_state.items() if isinstance(v, torch.Tensor)}
            progress[name] = {"next": buffer_state["next"], "size": buffer_state["size"]}
        elif isinstance(value, list):
            tensors[name] = torch.tensor(value, dtype=torch.int64)
        elif isinstance(value, deque):
            progress[name] = [float(x) for x in value]
        elif dataclasses.is_dataclass(value):
            progress[name] = dataclasses.asdict(value)
        else:
            progress[name] = value
    action_dim = next(v.action_dim for v in state.values() if hasattr(v, "action_dim"))
    metadata = {"variant": variant, "action_dim": str(action_dim), "progress": json.dumps(progress)}
    atomic_save(tensors, os.path.join(run_dir, CHECKPOINT), metadata)


def read_training_state(run_dir: str, variant: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and check `run_dir/checkpoint.safetensors`: (tensors, progress). One-line errors name the fix."""
    from safetensors import safe_open

    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise UserError(
            f"no checkpoint at {path}: pass --resume runs/<run_name> of a run saved with --checkpoint-every"
        )
    try:
        with safe_open(path, "pt") as f:
            metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:
        raise UserError(f"{path} is corrupted or truncated ({error}): resume from another run or start anew") from None
    verify_checksum(tensors, metadata, path)
    if metadata.get("variant") != variant:
        raise UserError(f"{path} was written by {metadata.get('variant')}.py, not {variant}.py: resume it with that")
    progress = json.loads(metadata["progress"])
    progress["action_dim"] = int(metadata["action_dim"])
    return tensors, progress


def restore_training_state(state: dict, tensors: dict[str, torch.Tensor], progress: dict) -> dict:
    """Put what `save_training_state` saved back into the objects of `state`; returns the saved plain values."""
    device, plain = _device(state), {}
    restore_rng(tensors, device)
    for name, value in state.items():
        if name == "window":
            value.load_window_state({k[len("window.") :]: v for k, v in tensors.items() if k.startswith("window.")})
        elif isinstance(value, torch.nn.Module):
            value.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        elif isinstance(value, torch.optim.Optimizer):
            load_optimizer_tensors(name, value, tensors)
        elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
            value.load_state_dict(progress[name])
            for group, lr in zip(value.optimizer.param_groups, value.get_last_lr(), strict=True):
                group["lr"] = lr  # the learning rate the saved run's next update would have used
        elif isinstance(value, np.random.Generator):
            value.bit_generator.state = progress[name]
        elif hasattr(value, "load_state_dict"):  # the replay buffer
            value.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
                                  | progress[name])  # fmt: skip
        elif isinstance(value, list):
            value[:] = tensors[name].tolist()
        elif isinstance(value, deque):
            value.extend(progress[name])
        elif not dataclasses.is_dataclass(value):
            plain[name] = progress[name]
    return plain


def resume_args(args, progress: dict):
    """The saved run's Args (each field's type checked), with what this command line decides: `--resume`,
    `--device`, `--compile`, `--torch-threads`, and `--total-timesteps` when it is given (else the saved total)."""
    check_config(type(args), progress["args"], os.path.join(args.resume, CHECKPOINT))
    step, total = progress["global_step"], progress["args"]["total_timesteps"]
    total = args.total_timesteps if given_on_command_line("total_timesteps") else total
    if total < step:
        raise UserError(f"--total-timesteps {total} < step {step}, where {args.resume} stopped: give >= {step}")
    given = {k: getattr(args, k) for k in ("resume", "device", "compile", "torch_threads")}
    fields = {f.name for f in dataclasses.fields(args)}  # a field this script no longer has is left out
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in progress["args"].items() if k in fields}
    return type(args)(**{**saved, **given, "total_timesteps": total, "run_dir": args.resume})


def resume(args, variant: str):
    """`--resume FOLDER`: lock the folder (first: a second process on it stops here, naming the one that trains in
    it), read its training state and take the saved run's settings (`resume_args`). Returns (args, saved), where
    saved is (tensors, progress) for `restore_training_state`, or None for a new run."""
    if not args.resume:
        return args, None
    lock_run_folder(args.resume)
    saved = read_training_state(args.resume, variant)
    return resume_args(args, saved[1]), saved


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
    Holding it again is a no-op; without fcntl (Windows) there is no lock."""
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
    remove_stale_temporaries(run_dir)
    atexit.register(_unlock, key, path)


def _unlock(key: str, path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)  # while still holding it: a process that opened it meanwhile retries on the new file
    os.close(_locks.pop(key))


class StopOnSignal:
    """From its creation until `restore()`, a first SIGINT (Ctrl-C) or SIGTERM only sets `.signal`: the training
    loop stops at its next step boundary and saves. A second one aborts at once (`Interrupted`; the files being
    written stay whole, see `atomic_write`). `restore()` puts the previous handlers back."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise Interrupted(f"{name} again: aborted at once, without saving (the last checkpoint stays)", signum)
        self.signal = signum
        os.write(2, f"\n{name}: stopping after this step to save the run (again: abort at once)\n".encode())


def resume_loop(state: dict, saved, env) -> tuple:
    """Continue a resumed run where it stopped: refuse an env with another action space, put the saved values back
    into the objects of the training loop's `state` (`restore_training_state`) and bring the env to where the run
    left it (`replay_env`). Returns (global_step, updates, update_budget, episode_start, obs)."""
    tensors, progress = saved
    agent, args = state["agent"], state["args"]
    if progress["action_dim"] != agent.action_dim:
        raise UserError(f"{args.resume} has {progress['action_dim']} actions but {args.env_id} has {agent.action_dim}")
    plain = restore_training_state(state, tensors, progress)
    print(f"resuming {state['run_name']} at step {plain['global_step']}: replaying the env", flush=True)
    obs = replay_env(env, args.seed, state["action_history"])
    return plain["global_step"], plain["updates"], plain["update_budget"], plain["episode_start"], obs


def stopped(signum: int, step: int, total: int, run_dir: str, variant: str, agent_path: str | None) -> Interrupted:
    """The exception ending a run stopped by `signum` after its state was saved: where it is and how to resume."""
    agent = f", the agent in {agent_path}" if agent_path else ""
    return Interrupted(
        f"stopped by {signal.Signals(signum).name} at step {step}/{total}: the training state is in "
        f"{os.path.join(run_dir, CHECKPOINT)}{agent}; continue with: python {variant}.py --resume "
        f"{shlex.quote(run_dir)}",
        signum,
    )


def replay_env(env, seed: int, actions: list[int]):
    """Bring a fresh env to where the saved run left it: ALE is deterministic given the seed and the actions."""
    obs, _ = env.reset(seed=seed)
    for action in actions:
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    return obs
