"""The one exception type that reaches users as a one-line message instead of a traceback, and
the warning a renamed module gives through its old name."""


class UserError(Exception):
    """Bad input or environment: the message names the file and what is wrong.

    Command-line entry points catch it, print ``error: <message>`` to stderr and exit 1.
    """


class Terminated(BaseException):
    """SIGTERM arrived: unwind (every ``finally`` and atomic writer cleans up), then exit 143.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` does not swallow it.
    """


def moved(old: str, new: str) -> None:
    """Warn that module ``old`` is now ``new`` (the alias goes in the next release). The
    warning names the line that imported ``old``, so Python shows it when that is a script."""
    import sys
    import warnings

    frame = sys._getframe(1)
    while frame.f_back is not None and (frame.f_code.co_filename.startswith("<frozen")
                                        or frame.f_globals.get("__name__") == old):
        frame = frame.f_back
    warnings.warn_explicit(f"{old} is now {new}; the old name goes away in the next release",
                           DeprecationWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))
