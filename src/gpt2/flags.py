"""Command-line flags: argparse with one-line errors, for every command and training's config.

    p = ArgumentParser(prog="gpt2 generate", formatter_class=HelpFormatter)
    p.parse_args(["--top_k", "x"])   # stderr: error: argument --top_k: invalid int value: 'x'
                                     # (see gpt2 generate --help); exit 2

A bad flag is one line and a pointer to ``--help``, not the whole usage.
"""

from __future__ import annotations

import argparse


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
