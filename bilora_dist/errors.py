"""The one exception type for user mistakes: printed as a single line, never as a traceback."""


class UserError(Exception):
    """Bad input from the user (flag, file, record, checkpoint). The message names the problem and where."""
