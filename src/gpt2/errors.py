"""The one exception type that reaches users as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the file and what is wrong.

    Command-line entry points catch it, print ``error: <message>`` to stderr and exit 1.
    """
