"""Shared helpers for the DRAMA scripts: Atari wrappers, evaluation, Hub push/pull, playing agents."""

import argparse
import os
import re
import select
import sys
from collections.abc import Callable

SIGPIPE_EXIT_CODE = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away


class UserError(Exception):
    """A mistake the user can fix (bad flag, unknown env id, wrong checkpoint).

    Scripts catch it and print its one-line message instead of a traceback.
    """


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal (SIGINT, SIGTERM, SIGUSR2): `run_cli` prints its one-line message and exits with
    128 + the signal's number (130, 143, 140), as a shell reports a process a signal ended. A KeyboardInterrupt, so
    that no `except Exception` on the way swallows it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def game_of(env_id: str) -> str:
    """The game of an env id: ALE/Krull-v5, KrullNoFrameskip-v4 and Krull all give Krull."""
    return re.sub(r"^ALE/|(NoFrameskip|Deterministic)?(-ram)?-v\d+$", "", env_id)


def command_parser(prog: str, description: str):
    """The parser of `python -m {prog} COMMAND ...` and the group its commands are added to."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    return parser, parser.add_subparsers(dest="command", required=True)


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


def device_of(module):
    """The device of a module's parameters (the CPU for a module without any)."""
    import torch

    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports POLLERR on such a write end)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced by an object without a file: not a pipe
        return False
    if not hasattr(select, "poll"):
        return True  # no poll (Windows): trust the BrokenPipeError
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def quiet_broken_pipe(command: Callable[[], object]) -> object:
    """Run `command()` and return what it returns; if the reader of stdout goes away (`... | head -1`), stop
    quietly with exit code 141 (as Unix tools killed by SIGPIPE) instead of a BrokenPipeError traceback.

    Wrap a script's whole entry point, argument parsing included (`--help | head -1`):
    `sys.exit(quiet_broken_pipe(lambda: main(tyro.cli(Args))))`. stdout is flushed before returning (also on
    SystemExit, as after --help), so a write that fails surfaces here, not at interpreter exit; then stdout is
    pointed at os.devnull, so that Python's own flush at exit cannot fail again (Python docs, "Note on
    SIGPIPE"). A BrokenPipeError of another pipe (a subprocess, a socket) is not swallowed.
    """
    try:
        try:
            result = command()
        except SystemExit:
            sys.stdout.flush()
            raise
        sys.stdout.flush()
        return result
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return SIGPIPE_EXIT_CODE


def run_cli(command: Callable[[], object]) -> int:
    """Run a command-line entry point: a UserError becomes one line on stderr and exit code 2, no traceback;
    Ctrl-C (or an `Interrupted`) one line and exit code 130 (or its own); a closed stdout (`| head -1`) ends it
    quietly with exit code 141 (`quiet_broken_pipe`)."""

    def run() -> int:
        try:
            command()
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as error:
            print(str(error) or "interrupted (Ctrl-C)", file=sys.stderr)
            return getattr(error, "exit_code", 130)
        return 0

    return quiet_broken_pipe(run)
