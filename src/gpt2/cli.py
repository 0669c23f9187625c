"""``gpt2 <command>`` / ``python -m gpt2 <command>``: one entry point for every tool.

Each command lives in its own module of :mod:`gpt2.commands` with ``main(argv) -> int``; the
flat scripts of the original layout (``download_model.py``, ``encode.py``, ``train.py``, ...)
call the same functions through :func:`script`. Modules are imported only when their command
runs, so ``gpt2 --help`` stays fast. Every command's parser is
:class:`gpt2.flags.ArgumentParser`: a bad flag is one line and a pointer to ``--help``.
"""

from __future__ import annotations

import importlib
import signal
import sys

from .errors import Terminated, UserError
from .flags import ArgumentParser, HelpFormatter  # noqa: F401 (their old home)

# command -> (module, help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("gpt2.commands.download", "fetch a released model (124M, 355M, 774M, 1558M)"),
    "encode": ("gpt2.commands.encode",
               "encode text files into .npz or a memory-mapped .bin of tokens"),
    "train": ("gpt2.commands.train", "fine-tune a model, or train one from scratch"),
    "sample": ("gpt2.commands.sample:unconditional_main", "print unconditional samples"),
    "interact": ("gpt2.commands.sample:interactive_main", "complete prompts typed at a prompt"),
    "tokenizer": ("gpt2.commands.tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    "evaluate": ("gpt2.commands.evaluate",
                 "loss and perplexity on a dataset; HellaSwag, LAMBADA, WikiText scores"),
    "lm-eval": ("gpt2.commands.lm_eval", "run lm-evaluation-harness tasks on a model"),
    "generate": ("gpt2.commands.generate", "generate samples from prompts to a file"),
    "export": ("gpt2.commands.export",
               "write a model for other tools: Hugging Face, OpenAI release, GGUF, ONNX"),
    "plot": ("gpt2.commands.plot", "plot a run's training and validation loss"),
    "lora": ("gpt2.commands.lora", "merge a LoRA adapter into a plain model directory"),
    "chat": ("gpt2.commands.chat", "talk to a model in the terminal, through its chat template"),
    "serve": ("gpt2.commands.serve", "serve a model over OpenAI's completions API"),
    "quickstart": ("gpt2.commands.quickstart",
                   "the README's demo: tokenizer + small GPT-2 on pydoc text"),
}


def _resolve(target: str):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func or "main")


def _terminate(signum, frame) -> None:
    raise Terminated()


def run(func, argv: list[str] | None = None) -> int:
    """Call a command's main, turning user errors, Ctrl-C and SIGTERM into a message and an
    exit code. SIGTERM unwinds like Ctrl-C, so temporary files and worker processes are cleaned
    up (training catches both itself and saves first)."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        previous = None
    try:
        return int(func(argv) or 0)
    except UserError as e:  # one line, whatever a library's message it quotes holds
        lines = (line.strip() for line in str(e).splitlines())
        print("error: " + " ".join(line for line in lines if line), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # e.g. `gpt2 sample | head`
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def script(command: str) -> None:
    """Entry point of the flat scripts: ``script("download")`` runs ``gpt2 download``."""
    sys.exit(run(_resolve(COMMANDS[command][0]), sys.argv[1:]))


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: gpt2 <command> [options]   (gpt2 <command> --help for its flags)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run(_resolve(COMMANDS[argv[0]][0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main())
