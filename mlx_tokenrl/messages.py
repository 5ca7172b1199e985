"""What the package says to the user: errors in their input (one line, no traceback), an
exception's reason in one line, warnings once per process.

Kept free of MLX and mlx-lm so that the CLI's help and its argument errors answer at once."""

import functools
import sys


class InputError(Exception):
    """Bad input from the user (a setting, a file, a model name): the CLI reports it as one
    `error:` line and exit code 1, without a traceback."""


def first_line(exc: BaseException) -> str:
    """A one-line reason from an exception whose message may span lines (or be empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def warn(message: str):
    """One `warning:` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


@functools.cache
def warn_once(message: str):
    warn(message)
