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


def run_cli(command: Callable[[], object]) -> int:
    """Run a command-line entry point: a UserError becomes one line on stderr and exit code 2, no traceback."""
    try:
        command()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
