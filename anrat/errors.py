"""The exception types a command line turns into one line: bad user input, and a failed write.

Command-line entry points catch :class:`InputError` and turn it into one line on stderr and exit
status 2, and :class:`WriteFailed` into one line and exit status 1; everything else is a bug and
keeps its traceback.
"""


class InputError(ValueError):
    """A value, file or option supplied by the user is wrong; the message says what was expected."""


class WriteFailed(OSError):
    """A file could not be written (no space left, quota, I/O error): the input was fine, the
    machine refused. The message names the file, the cause, and what is left of it."""
