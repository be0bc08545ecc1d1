"""Saving a run: the agent (`agent.safetensors` + `args.json`, read back by `utils.hub.load_agent`) and the full
training state (`checkpoint.safetensors`, read back by `--resume`), each written atomically.

The training state is handed over as a dict name -> value and saved by the value's kind, so that every drama_*.py
script shares this code and none changes when it does:

    nn.Module             tensors  "{name}.{key}" (its state dict)
    torch Optimizer       tensors  "{name}.{i}.{key}" (the i-th parameter's state; `step` is kept on the CPU)
    LR scheduler          progress[name] (its state dict)
    np.random.Generator   progress[name] (its bit generator's state)
    replay buffer         tensors  "{name}.{array}" (its numpy arrays up to `size`), progress[name] {next, size}
    list of deques        tensors  "window.{i}.z", "window.{i}.actions" (the agent's acting windows of (z, a))
    list of ints          tensor   name (int64; the actions taken so far, to replay the env)
    deque                 progress[name] (floats, e.g. the recent returns)
    dataclass             progress[name] (its fields; the run's Args)
    int, float, bool, str progress[name] (the loop's counters)

with the metadata {"variant", "action_dim", "progress": JSON}, and torch's CPU generator ("torch_rng") and, on a GPU,
the CUDA one ("cuda_rng"). `restore_training_state` puts the saved values back into the objects of the same dict
and returns the plain values.
"""

import dataclasses
import json
import os
import sys
from collections import deque

import numpy as np
import torch

from utils import UserError

CHECKPOINT = "checkpoint.safetensors"


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file to `path.tmp`, then rename: a crash mid-write leaves the old file intact."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)


def save_agent(agent: torch.nn.Module, args, run_dir: str, variant: str) -> str:
    """Write `agent.safetensors` (weights and normaliser statistics) and `args.json`, each atomically."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "agent.safetensors")
    metadata = {"variant": variant, "action_dim": str(agent.action_dim), "env_id": args.env_id}
    atomic_save(agent.state_dict(), path, metadata)
    with open(os.path.join(run_dir, "args.json.tmp"), "w") as f:
        json.dump({**dataclasses.asdict(args), "variant": variant, "action_dim": agent.action_dim}, f, indent=2)
    os.replace(os.path.join(run_dir, "args.json.tmp"), os.path.join(run_dir, "args.json"))
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


def _buffer_arrays(buffer) -> dict[str, np.ndarray]:
    return {k: v for k, v in vars(buffer).items() if isinstance(v, np.ndarray)}


def _device(state: dict) -> torch.device:
    module = next(v for v in state.values() if isinstance(v, torch.nn.Module))
    return next(module.parameters()).device


def save_training_state(run_dir: str, state: dict, variant: str) -> None:
    """Everything a run needs to continue exactly (see the module's docstring), to `run_dir/checkpoint.safetensors`."""
    tensors, progress = rng_tensors(_device(state)), {}
    for name, value in state.items():
        if isinstance(value, torch.nn.Module):
            tensors |= {f"{name}.{k}": v for k, v in value.state_dict().items()}
        elif isinstance(value, torch.optim.Optimizer):
            tensors |= optimizer_tensors(name, value)
        elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
            progress[name] = value.state_dict()
        elif isinstance(value, np.random.Generator):
            progress[name] = value.bit_generator.state
        elif _buffer_arrays(value) if hasattr(value, "__dict__") else False:
            tensors |= {f"{name}.{k}": torch.from_numpy(v[: value.size]) for k, v in _buffer_arrays(value).items()}
            progress[name] = {"next": value.next, "size": value.size}
        elif isinstance(value, list) and value and isinstance(value[0], deque):
            for i, window in enumerate(value):
                if window:
                    tensors[f"window.{i}.z"] = torch.stack([z for z, _ in window])
                    tensors[f"window.{i}.actions"] = torch.stack([a for _, a in window])
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
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:
        raise UserError(f"{path} is corrupted or truncated ({error}): resume from another run or start anew") from None
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
        if isinstance(value, torch.nn.Module):
            value.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        elif isinstance(value, torch.optim.Optimizer):
            load_optimizer_tensors(name, value, tensors)
        elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
            value.load_state_dict(progress[name])
            for group, lr in zip(value.optimizer.param_groups, value.get_last_lr(), strict=True):
                group["lr"] = lr  # the learning rate the saved run's next update would have used
        elif isinstance(value, np.random.Generator):
            value.bit_generator.state = progress[name]
        elif _buffer_arrays(value) if hasattr(value, "__dict__") else False:
            for array_name, array in _buffer_arrays(value).items():
                array[: progress[name]["size"]] = tensors[f"{name}.{array_name}"].numpy()
            value.next, value.size = progress[name]["next"], progress[name]["size"]
        elif isinstance(value, list) and value and isinstance(value[0], deque):
            for i, window in enumerate(value):
                if f"window.{i}.z" in tensors:
                    z, actions = tensors[f"window.{i}.z"].to(device), tensors[f"window.{i}.actions"].to(device)
                    window.extend(zip(z, actions, strict=True))
        elif isinstance(value, list):
            value[:] = tensors[name].tolist()
        elif isinstance(value, deque):
            value.extend(progress[name])
        elif not dataclasses.is_dataclass(value):
            plain[name] = progress[name]
    return plain


def resume_args(args, progress: dict):
    """The saved run's Args, with what this command line decides: `--resume`, `--device`, `--compile`,
    `--torch-threads`, and `--total-timesteps` when it is given (else the saved total)."""
    step, total = progress["global_step"], progress["args"]["total_timesteps"]
    total = args.total_timesteps if given_on_command_line("total_timesteps") else total
    if total < step:
        raise UserError(f"--total-timesteps {total} < step {step}, where {args.resume} stopped: give >= {step}")
    given = {k: getattr(args, k) for k in ("resume", "device", "compile", "torch_threads")}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in progress["args"].items()}  # JSON lists: tuples
    return type(args)(**{**saved, **given, "total_timesteps": total, "run_dir": args.resume})


def given_on_command_line(field: str) -> bool:
    """Whether the flag of this Args field is on the command line (tyro takes `--a-b`, `--a_b` and `--a-b=1`)."""
    flags = {"--" + field, "--" + field.replace("_", "-")}
    return any(arg.split("=")[0] in flags for arg in sys.argv[1:])


def run_folder(args, run_name: str) -> str:
    """Where the run's logs, checkpoints and agent go: the resumed folder, `--run-dir`, or runs/<run_name>."""
    run_dir = args.resume or args.run_dir or os.path.join("runs", run_name)
    taken = [f for f in ("args.json", CHECKPOINT) if os.path.exists(os.path.join(run_dir, f))]
    if args.run_dir and not args.resume and taken:
        raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir} or pick another --run-dir")
    return run_dir


def replay_env(env, seed: int, actions: list[int]):
    """Bring a fresh env to where the saved run left it: ALE is deterministic given the seed and the actions."""
    obs, _ = env.reset(seed=seed)
    for action in actions:
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    return obs
