"""The one exception type that reaches users as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the file and what is wrong.

    Command-line entry points catch it, print ``error: <message>`` to stderr and exit 1.
    """


class Terminated(BaseException):
    """SIGTERM arrived: unwind (every ``finally`` and atomic writer cleans up), then exit 143.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` does not swallow it.
    """
