"""User errors: one clear sentence, a non-zero exit, no traceback (DESIGN.md, Conventions)."""
import functools
import sys


class UserError(Exception):
    """A mistake in what the user handed in (path, flag, checkpoint, data); the message names the fix."""


EXIT_USER_ERROR = 2


def main_guard(main):
    """Wrap an entry point's ``main`` so a :class:`UserError` prints ``error: <sentence>`` and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
