"""Errors raised for user mistakes (bad input, missing files): the CLI prints them without a traceback."""


class MechcliffError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, how to fix it."""
