"""User errors: one clear sentence, a non-zero exit, no traceback (DESIGN.md, Conventions)."""
import contextlib
import functools
import sys


class UserError(Exception):
    """A mistake in what the user handed in (path, flag, checkpoint, data); the message names the fix."""


class NonFiniteLoss(UserError):
    """A training loss turned nan/inf: the step raises it before the update, so parameters and files stay at
    the last finite state (issue 18 item 7)."""


EXIT_USER_ERROR = 2
WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_message(err):
    """The sentence of ``err``. A DataLoader worker's UserError is re-raised by torch with the worker's
    traceback as its message; the sentence is then the last line, after ``UserError: ``."""
    text = str(err)
    if WORKER_TRACEBACK not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    _, sep, sentence = last.partition("UserError: ")
    return sentence if sep else last


def main_guard(main):
    """Wrap an entry point's ``main`` so a :class:`UserError` prints ``error: <sentence>`` and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {user_message(err)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


@contextlib.contextmanager
def flag_errors():
    """Turn the ``ValueError``/``TypeError`` a library object raises for a bad setting (a loss built from the
    flags) into the entry point's one-sentence :class:`UserError` (the library itself knows no CLI)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
