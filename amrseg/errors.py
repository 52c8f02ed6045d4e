"""The one exception type that reaches users as a one-line message."""


class AmrsegError(Exception):
    """Bad input or an unrecoverable condition the user can fix: printed as one line, exit 2.

    The message names the file or flag at fault.
    """
