"""The one exception type for mistakes a user can make (bad path, bad key, malformed row).

The command line prints its message as a single line and exits non-zero; anything else that
escapes is a bug in jaxrm and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
