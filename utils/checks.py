"""The run's settings that every drama_*.py script shares the handling of: their ranges, by field name
(`check_ranges`), and a saved run's settings read back into its `Args` (`args_from_config`).

Each failure is a one-line UserError `--flag-name ...: how to fix`. The checks about the model itself (head
dimension, context length, encoder filters, DFS temperatures) stay in the scripts' `check_args`.
"""

import dataclasses
import json
import math
import os
import shutil
import sysconfig
import types
import typing

from utils import UserError

POSITIVE = ("total_timesteps", "buffer_size", "batch_size", "sequence_length", "imagine_batch_size",
            "imagine_context_length", "imagine_horizon", "d_model", "d_state", "d_conv", "expand", "n_layers",
            "act_context_length", "stoch_categoricals", "stoch_classes", "warmup_updates", "log_every", "headdim",
            "chunk_size")  # fmt: skip
NON_NEGATIVE = ("random_steps", "eval_episodes", "train_ratio", "checkpoint_every", "dream_every", "free_bits",
                "dyn_loss_scale", "rep_loss_scale", "entropy_coef", "alpha", "beta", "torch_threads")  # fmt: skip


SEED_MAX = 2**32 - 1 - 1000  # numpy takes seeds below 2**32; the evaluation plays with seed + 1000
PLURALS = {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}


def _expected_type(value, hint) -> str | None:
    """None when a value read from JSON fits an Args field's type hint, else what the field needs, in words.

    Handles the hints Args uses (bool, int, float, str, Literal, X | None, tuple[X, ...]); other hints pass."""
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number and math.isfinite(value) else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is typing.Literal:
        return None if value in params else f"one of {', '.join(json.dumps(p) for p in params)}"
    if origin in (typing.Union, types.UnionType):
        needs = [_expected_type(value, p) for p in params]
        return None if None in needs else " or ".join(needs)
    if origin is tuple and len(params) == 2 and params[1] is Ellipsis:
        fits = isinstance(value, list) and all(_expected_type(v, params[0]) is None for v in value)
        return None if fits else f"a list of {PLURALS.get(params[0], 'values')}"
    if hint is type(None):
        return None if value is None else "null"
    return None


def check_config(args_class, config: dict, path) -> None:
    """Refuse an args.json whose fields do not fit `args_class` (the variant's Args): one line naming the field
    and the file, before any model is built from it. Keys Args does not know are ignored (as `args_from_config`)."""
    hints = typing.get_type_hints(args_class)
    for field in dataclasses.fields(args_class):
        if field.name in config:
            expected = _expected_type(config[field.name], hints.get(field.name, object))
            if expected is not None:
                raise UserError(
                    f"{path}: {field.name!r} is {json.dumps(config[field.name])}, but {args_class.__name__}."
                    f"{field.name} needs {expected}: fix it or re-save the agent"
                )


def args_from_config(args_class, config: dict, path):
    """`args_class` (a script's Args) from a saved run's settings: its args.json, or the "args" its checkpoint holds.
    Each field's type is checked first (`check_config`, errors name `path`); JSON lists become tuples; keys
    `args_class` does not know (`variant`, `action_dim`, a field a script no longer has) are left out, and fields
    the saved run lacks take their defaults. The script's range checks are for the caller (`check_args`)."""
    check_config(args_class, config, path)
    fields = {field.name for field in dataclasses.fields(args_class)}
    return args_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields})


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_ranges(args) -> None:
    """Finite numbers; positive sizes and learning rates; non-negative counts and weights; 0 < gamma <= 1,
    0 <= lam <= 1, EMA decays in [0, 1); a buffer that holds a sequence, random steps that fill one, a run at
    least as long as its random steps; a seed numpy takes; an upload of a saved agent. Fields the Args lacks are
    skipped."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag(name)} must be a finite number, got {value}")
    for name in (*POSITIVE, *(n for n in values if n.endswith("_lr") or n.endswith("_grad_clip"))):
        if name in values and values[name] <= 0:
            raise UserError(f"{flag(name)} must be positive, got {values[name]}: give a number > 0")
    for name in NON_NEGATIVE:
        if name in values and values[name] < 0:
            raise UserError(f"{flag(name)} must be >= 0, got {values[name]}")
    if "seed" in values and not 0 <= values["seed"] <= SEED_MAX:
        raise UserError(f"--seed must be in [0, {SEED_MAX}], got {values['seed']}: a seed such as 1")
    if "gamma" in values and not 0 < values["gamma"] <= 1:
        raise UserError(f"--gamma must be in (0, 1], got {values['gamma']}: a discount such as 0.985")
    if "lam" in values and not 0 <= values["lam"] <= 1:
        raise UserError(f"--lam must be in [0, 1], got {values['lam']}: a lambda such as 0.95")
    for name in (n for n in values if n.endswith("_decay")):
        if not 0 <= values[name] < 1:
            raise UserError(f"{flag(name)} must be in [0, 1), got {values[name]}: an EMA decay such as 0.99")
    if args.upload_model and not args.save_model:
        raise UserError("--upload-model needs the saved agent: drop --no-save-model")
    if args.sequence_length > args.buffer_size:
        raise UserError(f"--sequence-length {args.sequence_length} is longer than --buffer-size {args.buffer_size}")
    if args.random_steps < args.sequence_length:
        raise UserError(
            f"--random-steps {args.random_steps} must be >= --sequence-length {args.sequence_length} "
            "so that the first world-model batch exists"
        )
    if args.total_timesteps < args.random_steps:
        raise UserError(
            f"--total-timesteps {args.total_timesteps} is shorter than --random-steps {args.random_steps}: "
            "the agent would never train; lower --random-steps or raise --total-timesteps"
        )


def check_compiler(device, compile: bool, triton_scan: bool = False) -> None:
    """Code built at run time needs a compiler: `compile` (--compile) builds inductor's C++ on a CPU; on CUDA, Triton
    builds C launchers, for --compile and for mamba_ssm's fused Mamba-2 scan (`triton_scan`) alike."""
    if compile and device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise UserError("--compile on CPU needs a C++ compiler: install one (apt-get install g++) or drop --compile")
    if device.type != "cuda" or not (compile or triton_scan):
        return
    if os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"):
        headers = sysconfig.get_paths()["include"]  # Triton's launchers include Python.h
        if not os.path.exists(os.path.join(headers, "Python.h")):
            raise UserError(
                f"Triton on CUDA builds C launchers that need Python's C headers, and {headers} has no Python.h: "
                "install them (apt-get install python3-dev)" + ("" if triton_scan else " or drop --compile")
            )
        return
    if triton_scan:
        raise UserError(
            "mamba_ssm's fused Mamba-2 scan builds Triton kernels on CUDA and needs a C compiler: install one "
            "(apt-get install gcc) or set CC (without mamba-ssm the scripts run the slower pure-PyTorch scan)"
        )
    raise UserError(
        "--compile on CUDA needs a C compiler for Triton: install one (apt-get install gcc), set CC, or drop --compile"
    )
