"""Shared helpers for the DRAMA scripts: Atari wrappers, evaluation, Hub push/pull, playing agents."""

import re
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix (bad flag, unknown env id, wrong checkpoint).

    Scripts catch it and print its one-line message instead of a traceback.
    """


def game_of(env_id: str) -> str:
    """The game of an env id: ALE/Krull-v5, KrullNoFrameskip-v4 and Krull all give Krull."""
    return re.sub(r"^ALE/|(NoFrameskip|Deterministic)?(-ram)?-v\d+$", "", env_id)


def resolve_device(name: str):
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N` -> torch.device; one-line errors."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available: use --device cpu")
    return device


def run_cli(command: Callable[[], object]) -> int:
    """Run a command-line entry point: a UserError becomes one line on stderr and exit code 2, no traceback."""
    try:
        command()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
