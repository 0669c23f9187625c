"""``gpt2 chat MODEL_DIR``: talk to a model in the terminal, one turn at a time, streamed.

    gpt2 chat checkpoint/run1 --system "You are terse."
    > What is 2+2?
    4
    > /reset                 forget the conversation
    > /system TEXT           a new system message (the conversation starts over)
    > (Ctrl-D)               quit

The conversation goes through the model's chat template (its ``chat_template.jinja``, else
gpt2's own; ``--chat_template`` another) and each reply ends at ``<|endoftext|>``. When the
history no longer fits the model's context its oldest turns are dropped, with a note.
"""

from __future__ import annotations

import sys

from ..flags import ArgumentParser
from ..conversation import prompt_ids, reply
from ..errors import UserError
from ..io.inference import load_for_inference
from ..tokenizer.chat import ChatTemplate
from .common import (add_dtype_argument, add_speculation_arguments, check_sampling_flags,
                     generator_for, speculator_for)

PROMPT = "> "


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gpt2 chat", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="model directory (ours, a run, release or Hugging Face) or a released name")
    p.add_argument("--system", default=None, help="a system message to start with")
    p.add_argument("--max_tokens", type=int, default=200, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_k", type=int, default=40, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="0 or 1: off")
    p.add_argument("--seed", type=int, default=None, help="seed the replies (default: random)")
    p.add_argument("--chat_template", default=None, metavar="FILE",
                   help="a Jinja chat template (default: the model's, else gpt2's own)")
    p.add_argument("--device", default=None, help="torch device (default: the accelerator if "
                   "there is one)")
    add_dtype_argument(p)
    add_speculation_arguments(p)
    return p


def _lines():
    while True:
        try:
            line = input(PROMPT) if sys.stdin.isatty() else sys.stdin.readline()
        except EOFError:
            return
        if not sys.stdin.isatty() and line == "":
            return
        yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_sampling_flags(args)
    if args.max_tokens < 1:
        raise UserError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    model, enc, device, model_dir = load_for_inference(args.model_dir, args.device, args.dtype)
    if enc.eot_token is None:
        raise UserError(f"{model_dir}: the tokenizer has no <|endoftext|>, which ends a reply")
    n_ctx = model.config.n_ctx
    if args.max_tokens >= n_ctx:
        raise UserError(f"--max_tokens {args.max_tokens} leaves no room for the conversation "
                        f"in n_ctx {n_ctx}")
    speculator = speculator_for(args, model, enc, device)
    template = ChatTemplate.for_model(model_dir, args.chat_template)
    generator = generator_for(device, args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict] = []
    try:
        for line in _lines():
            if line.strip() in ("/reset", "/system") or line.startswith("/system "):
                if line.startswith("/system"):
                    text = line[len("/system"):].strip()
                    system = [{"role": "system", "content": text}] if text else []
                turns = []
                print("(the conversation starts over)", file=sys.stderr, flush=True)
                continue
            if not line.strip():
                continue
            turns.append({"role": "user", "content": line})
            ids, dropped = prompt_ids(template, enc, system + turns, n_ctx, args.max_tokens)
            if dropped:
                turns = turns[dropped:]
                print(f"(the conversation is longer than the model's context: its oldest "
                      f"{dropped} turn(s) are forgotten)", file=sys.stderr, flush=True)
            text, _ = reply(model, enc, ids, args.max_tokens, args.temperature, args.top_k,
                            args.top_p, generator,
                            on_text=lambda t: print(t, end="", flush=True),
                            speculator=speculator)
            print(flush=True)
            turns.append({"role": "assistant", "content": template.content_of(text)})
    except KeyboardInterrupt:
        print()
    return 0
