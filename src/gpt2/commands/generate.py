"""Generate samples from prompts into a file: text with ``====================`` delimiters
(as gpt-2-simple writes them) or JSON lines with the prompt, the sample and the settings.

    gpt2 generate checkpoint/run1 --nsamples 10 --top_k 40 --out samples.txt      # unconditional
    gpt2 generate checkpoint/run1 --prompts prompts.jsonl --nsamples 3 --batch_size 3 \\
        --length 200 --temperature 0.7 --stop "<|endoftext|>" --stop "\\n\\n" --out out.jsonl

    from gpt2.sampling import generate_batch       # the library call underneath
    texts = generate_batch(model, enc, context_ids, n=4, length=100, top_k=40, stop=["\\n\\n"])

Each row of a batch stops on its own: its text is cut before the first stop string and the row
leaves the batch (its cache is dropped), and generation ends as soon as every row is done. The
samples of one batch share one prompt, so no padding or attention mask is needed. A prompt too
long for ``n_ctx`` together with ``--length`` keeps its last tokens, with a warning. The output
file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tqdm import tqdm

from ..flags import ArgumentParser, HelpFormatter
from ..errors import UserError
from ..files.atomic import atomic_write
from ..data.records import field_text, file_kind, parse_json, records
from ..io.inference import load_for_inference
from ..sampling import generate_batch
from .common import (add_dtype_argument, add_speculation_arguments, check_sampling_flags,
                     generator_for, speculator_for)

DELIMITER = "=" * 20


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: records with a "prompt" field (.jsonl, .json, .parquet, or lines
    that are all JSON objects), or one prompt per line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts {file}: file not found")
    if file_kind(file)[0] in ("jsonl", "json", "parquet"):
        prompts = [field_text(r, "prompt", where) for r, where in records(file)]
    else:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"--prompts {file}: not UTF-8 text (byte {e.start})") from None
        numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
        prompts = [line for _, line in numbered]
        if numbered and all(line.lstrip().startswith("{") for _, line in numbered):
            prompts = [field_text(parse_json(line, f"{file}:{i}"), "prompt", f"{file}:{i}")
                       for i, line in numbered]
    if not prompts:
        raise UserError(f"--prompts {file}: no prompts in the file")
    return prompts


def _fit(ids: list[int], length: int, n_ctx: int, number: int) -> list[int]:
    keep = n_ctx + 1 - length  # the last sampled token is never fed back
    if len(ids) > keep:
        print(f"warning: prompt {number} has {len(ids)} tokens; keeping its last {keep} so that "
              f"--length {length} fits the model's n_ctx {n_ctx}", file=sys.stderr)
        return ids[-keep:]
    return ids


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` typed in a shell argument become a newline, a tab, a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _format(record: dict, jsonl: bool) -> str:
    if jsonl:
        return json.dumps(record, ensure_ascii=False) + "\n"
    return record["sample"] + "\n" + DELIMITER + "\n"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="gpt2 generate", formatter_class=HelpFormatter,
        description="Generate samples, unconditionally or from prompts, to a file or stdout.")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="model directory (ours, release or Hugging Face) or a released name")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeatable); without --prompt/--prompts samples are "
                        "unconditional, starting from <|endoftext|>")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="file of prompts: one per line, or JSON lines with a \"prompt\" field")
    p.add_argument("--nsamples", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch_size", type=int, default=1, help="samples generated in parallel")
    p.add_argument("--length", type=int, default=None,
                   help="maximum new tokens per sample (default: n_ctx // 2)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits; lower is more conservative, 0 is greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens "
                                                         "(0: no limit; 40 is a good value)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling: keep the most likely tokens whose cumulative "
                        "probability is <= p (0 or 1: no limit)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed; the same seed and flags give the same samples")
    p.add_argument("--stop", action="append", default=[],
                   help="end a sample at this string, which is cut off (repeatable; \\n and "
                        "\\t are understood, e.g. '<|endoftext|>' or '\\n\\n')")
    p.add_argument("--include_prompt", action="store_true",
                   help="write the prompt before each sample")
    p.add_argument("--out", default=None,
                   help="output file: .jsonl for JSON lines, else text with ==================== "
                        "delimiters (default: stdout)")
    p.add_argument("--chat", action="store_true",
                   help="--prompts holds chats ({\"messages\": [...]} per line): write the "
                        "assistant's reply to each, through the model's chat template, ending "
                        "at <|endoftext|>")
    p.add_argument("--chat_template", default=None, metavar="FILE",
                   help="with --chat: a Jinja chat template (default: the model's, else "
                        "gpt2's own)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    add_dtype_argument(p)
    add_speculation_arguments(p)
    return p


def read_chats(path: str) -> list[list[dict]]:
    """--chat --prompts FILE: the messages of each record (a .jsonl/.json/.parquet of chats)."""
    from ..data.examples import parse_messages

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts {file}: file not found")
    chats = [parse_messages(r.get("messages") if isinstance(r, dict) else None, where,
                            "messages") for r, where in records(file)]
    if not chats:
        raise UserError(f"--prompts {file}: no chats in the file")
    return chats


def _write_replies(write, model, enc, chats: list[list[dict]], length: int, args, generator,
                   settings: dict, bar) -> None:
    from ..conversation import prompt_ids, reply
    from ..tokenizer.chat import ChatTemplate

    template = ChatTemplate.for_model(settings["model"], args.chat_template)
    jsonl = args.out is not None and Path(args.out).suffix == ".jsonl"
    for messages in chats:
        ids, dropped = prompt_ids(template, enc, messages, model.config.n_ctx, length)
        for index in range(args.nsamples):
            text, reason = reply(model, enc, ids, length, args.temperature, args.top_k,
                                 args.top_p, generator, speculator=args.speculator)
            record = {"messages": messages, "reply": template.content_of(text),
                      "finish_reason": reason,
                      "dropped_turns": dropped, "index": index, "settings": settings}
            write(json.dumps(record, ensure_ascii=False) + "\n" if jsonl else
                  record["reply"] + "\n" + DELIMITER + "\n")
            bar.update(1)


def _write_samples(write, model, enc, prompts: list[str], conditional: bool, length: int,
                   args, generator, settings: dict, bar) -> None:
    """Every sample of every prompt, formatted, through ``write``."""
    jsonl = args.out is not None and Path(args.out).suffix == ".jsonl"
    for number, prompt in enumerate(prompts, 1):
        ids = enc.encode(prompt) if conditional and prompt else [enc.eot_token]
        ids = _fit(ids, length, model.config.n_ctx, number)
        shown = enc.decode(ids) if conditional and prompt else ""
        done = 0
        while done < args.nsamples:
            n = min(args.batch_size, args.nsamples - done)
            texts = generate_batch(model, enc, ids, n, length, args.temperature, args.top_k,
                                   args.top_p, args.stop, generator, args.speculator)
            for text in texts:
                record = {"prompt": shown if conditional else None,
                          "sample": shown + text if args.include_prompt else text,
                          "index": done, "settings": settings}
                write(_format(record, jsonl))
                done += 1
            bar.update(n)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("nsamples", "batch_size", "length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
    check_sampling_flags(args)
    args.stop = [unescape(s) for s in args.stop]
    if args.chat and (args.prompt or not args.prompts):
        raise UserError("--chat reads chats from --prompts FILE (one {\"messages\": [...]} per "
                        "record); --prompt is for plain text")
    if args.chat and args.stop:
        raise UserError("--stop does not apply to --chat (a reply ends at <|endoftext|>)")
    chats = read_chats(args.prompts) if args.chat else None
    prompts = args.prompt + (read_prompts(args.prompts) if args.prompts and not chats else [])
    conditional = bool(prompts)
    prompts = chats if chats is not None else (prompts or [""])
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name")

    model, enc, device, model_dir = load_for_inference(args.model_dir, args.device, args.dtype)
    if enc.eot_token is None and not all(prompts):
        raise UserError(f"{model_dir}: the tokenizer has no <|endoftext|> token to start "
                        "unconditional samples from; give --prompt or --prompts")
    n_ctx = model.config.n_ctx
    length = args.length or n_ctx // 2
    if length > n_ctx:
        raise UserError(f"--length {length} is larger than the model's n_ctx {n_ctx}")
    args.speculator = speculator_for(args, model, enc, device)
    generator = generator_for(device, args.seed)
    settings = {"model": str(model_dir), "length": length, "temperature": args.temperature,
                "top_k": args.top_k, "top_p": args.top_p, "seed": generator.initial_seed(),
                "stop": args.stop}
    bar = tqdm(total=len(prompts) * args.nsamples, desc="generating", unit="sample",
               disable=None if out is not None else True)  # not over samples on stdout

    def run(write) -> None:
        if chats is not None:
            _write_replies(write, model, enc, chats, length, args, generator, settings, bar)
        else:
            _write_samples(write, model, enc, prompts, conditional, length, args, generator,
                           settings, bar)

    if out is None:
        run(lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    else:
        def to_file(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                run(f.write)

        atomic_write(out, to_file)
    bar.close()
    if out is not None:
        print(f"wrote {len(prompts) * args.nsamples} samples to {out}", file=sys.stderr)
    return 0
