"""The one exception type that reaches a CLI user as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong, where, and how to fix it.

    The CLI prints it as one line on stderr and exits with status 2.
    """
