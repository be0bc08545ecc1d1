"""What a run saves in its folder: the agent (`agent.safetensors` + `args.json`, read back by
`utils.hub.load_agent`) and the full training state (`checkpoint.safetensors`, read back by `--resume`), each
written atomically with the sha256 of its tensors (utils/files.py).

A checkpoint holds a `TrainingState`: the objects of the training loop, whose states are saved and put back in
place, and the loop's own values. Each object is saved by its state dict: its tensors as "{name}.{key}", its other
values as progress[name]:

    agent          tensors "agent.{key}" (weights and normaliser statistics)
    window         tensors "window.{i}.z", "window.{i}.actions" (`agent.window_state()`: the acting windows)
    wm_optimizer   tensors "wm_optimizer.{i}.{key}" (the i-th parameter's state; `step` is kept on the CPU)
    wm_scheduler   progress["wm_scheduler"]
    ac_optimizer, ac_scheduler   as the world model's
    buffer         tensors "buffer.{array}" (the stored rows), progress["buffer"] {next, size}
    rng            progress["rng"] (the numpy generator's state)

then the tensor "action_history" (int64: the actions taken, to replay the env), torch's CPU generator "torch_rng"
and, on a GPU, the CUDA one "cuda_rng"; progress["recent_returns"], the counters ("global_step", "updates",
"update_budget", "episode_start"), "run_name" and "args" (the run's Args). The file's metadata is {"variant",
"action_dim", "progress": JSON, "sha256"}.
"""

import dataclasses
import json
import os
from collections import deque
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from utils import UserError, device_of
from utils.files import atomic_save, remove_stale_temporaries, verify_checksum, write_text

AGENT, ARGS, CHECKPOINT = "agent.safetensors", "args.json", "checkpoint.safetensors"
RUN_FILES = (AGENT, ARGS, CHECKPOINT)  # the files of a run folder written atomically


def save_agent(agent: torch.nn.Module, args, run_dir: str, variant: str) -> str:
    """Write `agent.safetensors` (weights and normaliser statistics) and `args.json`, each atomically (the folder's
    stale temporary files go first: their space may be needed)."""
    os.makedirs(run_dir, exist_ok=True)
    remove_stale_temporaries(run_dir, RUN_FILES)
    path = os.path.join(run_dir, AGENT)
    metadata = {"variant": variant, "action_dim": str(agent.action_dim), "env_id": args.env_id}
    atomic_save(agent.state_dict(), path, metadata)
    config = {**dataclasses.asdict(args), "variant": variant, "action_dim": agent.action_dim}
    write_text(os.path.join(run_dir, ARGS), json.dumps(config, indent=2))
    print(f"agent saved to {path}")
    return path


@dataclasses.dataclass
class TrainingState:
    """What a checkpoint holds: everything a training loop needs to continue exactly where it stopped (the
    module's docstring gives the layout in the file). `save_training_state` writes it; `restore_training_state`
    puts a saved one back into the objects, the action history and the returns of this one, and sets its values."""

    args: object  # the run's Args
    run_name: str
    agent: torch.nn.Module  # with `window_state()` and `load_window_state(tensors)`
    wm_optimizer: torch.optim.Optimizer
    wm_scheduler: torch.optim.lr_scheduler.LRScheduler
    ac_optimizer: torch.optim.Optimizer
    ac_scheduler: torch.optim.lr_scheduler.LRScheduler
    buffer: object  # the replay buffer, with `state_dict()` and `load_state_dict(state)`
    rng: np.random.Generator  # the loop's numpy generator (random actions, DFS)
    action_history: list[int]  # every action taken, to replay the env
    recent_returns: deque  # the returns of the last episodes (the progress line)
    global_step: int  # env steps taken
    updates: int
    update_budget: float
    episode_start: bool  # the env's next frame starts an episode


@dataclasses.dataclass
class Checkpoint:
    """A `checkpoint.safetensors` read back and checked: its tensors and its progress (module docstring)."""

    tensors: dict[str, torch.Tensor]
    progress: dict
    action_dim: int

    @property
    def global_step(self) -> int:
        return self.progress["global_step"]

    @property
    def run_name(self) -> str:
        return self.progress["run_name"]

    @property
    def args(self) -> dict:
        return self.progress["args"]


def _saved_objects(state: TrainingState) -> dict[str, tuple[Callable[[], dict], Callable[[dict], None]]]:
    """The loop's objects by their name in the file: (their state dict, put one back)."""
    wm_optimizer, ac_optimizer = state.wm_optimizer, state.ac_optimizer
    return {
        "agent": (state.agent.state_dict, state.agent.load_state_dict),
        "wm_optimizer": (partial(optimizer_state, wm_optimizer), partial(load_optimizer_state, wm_optimizer)),
        "wm_scheduler": (state.wm_scheduler.state_dict, partial(load_scheduler_state, state.wm_scheduler)),
        "ac_optimizer": (partial(optimizer_state, ac_optimizer), partial(load_optimizer_state, ac_optimizer)),
        "ac_scheduler": (state.ac_scheduler.state_dict, partial(load_scheduler_state, state.ac_scheduler)),
        "buffer": (state.buffer.state_dict, state.buffer.load_state_dict),
        "rng": (lambda: state.rng.bit_generator.state, partial(setattr, state.rng.bit_generator, "state")),
        "window": (state.agent.window_state, state.agent.load_window_state),
    }  # fmt: skip


def save_training_state(run_dir: str, state: TrainingState, variant: str) -> None:
    """Everything a run needs to continue exactly (`TrainingState`), to `run_dir/checkpoint.safetensors` (the
    folder's stale temporary files go first: their space may be needed)."""
    tensors, progress = rng_tensors(device_of(state.agent)), {}
    for name, (get, _) in _saved_objects(state).items():
        for key, value in get().items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value
            else:
                progress.setdefault(name, {})[key] = value
    tensors["action_history"] = torch.tensor(state.action_history, dtype=torch.int64)
    progress |= {"recent_returns": [float(x) for x in state.recent_returns], "global_step": state.global_step,
                 "updates": state.updates, "update_budget": state.update_budget, "episode_start": state.episode_start,
                 "run_name": state.run_name, "args": dataclasses.asdict(state.args)}  # fmt: skip
    metadata = {"variant": variant, "action_dim": str(state.agent.action_dim), "progress": json.dumps(progress)}
    remove_stale_temporaries(run_dir, RUN_FILES)
    atomic_save(tensors, os.path.join(run_dir, CHECKPOINT), metadata)


def read_training_state(run_dir: str, variant: str) -> Checkpoint:
    """Read and check `run_dir/checkpoint.safetensors`. One-line errors name the fix."""
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
    return Checkpoint(tensors, json.loads(metadata["progress"]), int(metadata["action_dim"]))


def restore_training_state(state: TrainingState, saved: Checkpoint) -> None:
    """Put what `save_training_state` saved back into `state`: its objects, action history and recent returns in
    place, its values set."""
    restore_rng(saved.tensors, device_of(state.agent))
    for name, (_, put) in _saved_objects(state).items():
        prefix = name + "."
        tensors = {k[len(prefix) :]: v for k, v in saved.tensors.items() if k.startswith(prefix)}
        put({**tensors, **saved.progress.get(name, {})})
    state.action_history[:] = saved.tensors["action_history"].tolist()
    state.recent_returns.extend(saved.progress["recent_returns"])
    for name in ("global_step", "updates", "update_budget", "episode_start"):
        setattr(state, name, saved.progress[name])


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as "{i}.{key}" (the i-th parameter of its groups)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {f"{i}.{k}": v for i, p in enumerate(params) for k, v in optimizer.state.get(p, {}).items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        param = params[int(index)]
        on_cpu = value.dim() == 0  # LaProp's scalars (step, lr_avg) stay CPU tensors: no sync per parameter
        optimizer.state[param][name] = value if on_cpu else value.to(param.device)


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # the learning rate the saved run's next update would have used


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


def resume_loop(state: TrainingState, saved: Checkpoint, env) -> tuple:
    """Continue a resumed run where it stopped: refuse an env with another action space, put the saved state back
    into the training loop's `state` (`restore_training_state`) and bring the env to where the run left it
    (`replay_env`). Returns (global_step, updates, update_budget, episode_start, obs)."""
    args = state.args
    if saved.action_dim != state.agent.action_dim:
        raise UserError(f"{args.resume} has {saved.action_dim} actions but {args.env_id} has {state.agent.action_dim}")
    restore_training_state(state, saved)
    print(f"resuming {state.run_name} at step {state.global_step}: replaying the env", flush=True)
    obs = replay_env(env, args.seed, state.action_history)
    return state.global_step, state.updates, state.update_budget, state.episode_start, obs


def replay_env(env, seed: int, actions: list[int]):
    """Bring a fresh env to where the saved run left it: ALE is deterministic given the seed and the actions."""
    obs, _ = env.reset(seed=seed)
    for action in actions:
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    return obs
