"""Command-line flags: argparse with one-line errors, for every command and training's config.

    p = ArgumentParser(prog="gpt2 generate", formatter_class=HelpFormatter)
    p.parse_args(["--top_k", "x"])   # stderr: error: argument --top_k: invalid int value: 'x'
                                     # (see gpt2 generate --help); exit 2

A bad flag is one line and a pointer to ``--help``, not the whole usage. ``flag`` declares
a dataclass field that is also a flag (training's TrainConfig), with its checks.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import field
from typing import Callable


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what is wrong> (see <prog> --help)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is empty or the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        empty = action.default is None or action.default is False or action.default == []
        if empty or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def flag(default, help: str, *, group: str = "training controls", check: Callable | None = None,
         choices: tuple | None = None, metavar: str | None = None, shown: str | None = None):
    """A TrainConfig field that is also a command-line flag. ``shown``: what a default of None
    means, in words (README's flag tables say the same; a test compares them)."""
    return field(default=default, metadata={"help": help, "group": group, "check": check,
                                            "choices": choices, "metavar": metavar,
                                            "shown": shown})


def at_least(low: float) -> Callable:
    return lambda v: None if v >= low else f"must be >= {low:g}, got {v!r}"


def nonneg_number(v: float):
    return None if math.isfinite(v) and v >= 0 else f"must be a number >= 0, got {v!r}"


def in_range(low: float, high: float, closed: bool = False) -> Callable:
    def check(v):
        ok = low <= v <= high if closed else low <= v < high
        return None if ok else f"must be in [{low:g}, {high:g}{']' if closed else ')'}, got {v!r}"
    return check
