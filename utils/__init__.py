"""Shared helpers for the DRAMA scripts: Atari wrappers, evaluation, Hub push/pull, playing agents."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, unknown env id, wrong checkpoint).

    Scripts catch it and print its one-line message instead of a traceback.
    """
