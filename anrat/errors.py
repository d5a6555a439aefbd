"""The one exception type for bad user input.

Command-line entry points catch :class:`InputError` and turn it into one line on stderr and exit
status 2; everything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """A value, file or option supplied by the user is wrong; the message says what was expected."""
