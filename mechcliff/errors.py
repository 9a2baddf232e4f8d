"""Errors raised for user mistakes (bad input, missing files): the CLI prints them without a traceback; and the
default progress log of long-running calls."""

import sys


class MechcliffError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, how to fix it."""


def stderr_log(msg: str) -> None:
    """Write one progress message to stderr: the default ``log`` of long-running calls (``verbose=True``), so that
    library code writes nothing to stdout, which belongs to the commands."""
    print(msg, file=sys.stderr)  # noqa: T201 - the one place library code prints: to stderr, on purpose
