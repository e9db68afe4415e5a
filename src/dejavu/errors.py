"""The one error type for mistakes a user can fix (bad input, missing files, impossible
settings). The command line prints its message without a traceback; every other
exception is a bug and shows its traceback."""


class DejavuError(Exception):
    """An error the user can fix; the message names the problem and the fix."""
