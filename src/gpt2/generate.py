"""Generate samples from prompts into a file: text with ``====================`` delimiters
(as gpt-2-simple writes them) or JSON lines with the prompt, the sample and the settings.

    gpt2 generate checkpoint/run1 --nsamples 10 --top_k 40 --out samples.txt      # unconditional
    gpt2 generate checkpoint/run1 --prompts prompts.jsonl --nsamples 3 --batch_size 3 \\
        --length 200 --temperature 0.7 --stop "<|endoftext|>" --stop "\\n\\n" --out out.jsonl

    from gpt2.generate import generate_batch
    texts = generate_batch(model, enc, context_ids, n=4, length=100, top_k=40, stop=["\\n\\n"])

Each row of a batch stops on its own: its text is cut before the first stop string and the row
leaves the batch (its cache is dropped), and generation ends as soon as every row is done. The
samples of one batch share one prompt, so no padding or attention mask is needed. A prompt too
long for ``n_ctx`` together with ``--length`` keeps its last tokens, with a warning. The output
file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import UserError
from .sample import next_token  # the rule sample_sequence uses: same seed, same tokens
from .sample_scripts import check_sampling_flags

DELIMITER = "=" * 20


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is empty or the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        empty = action.default is None or action.default is False or action.default == []
        if empty or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def find_model_dir(text: str) -> Path:
    """A model directory from the command line: a path, or a released name under models/."""
    from .checkpoint import RELEASED_MODELS, canonical_name, resolve_model_dir

    path = Path(os.path.expandvars(os.path.expanduser(text)))
    if not path.is_dir() and canonical_name(text) in RELEASED_MODELS:
        return resolve_model_dir(text)
    return resolve_model_dir(model_dir=path)


def device_arg(name: str | None) -> torch.device:
    """``--device``: one rule for every command (gpt2.distributed.pick_device)."""
    from .distributed import pick_device

    return pick_device(name)


def cut_at_stop(text: str, stop: list[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, enc, context: list[int], n: int, length: int,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   stop: list[str] | None = None, generator: torch.Generator | None = None
                   ) -> list[str]:
    """``n`` continuations of one ``context`` (token ids), decoded, each cut at its first stop.

    ``enc`` needs only ``decode(ids) -> str``. A row that produced a stop string stops
    generating; the loop ends when every row has stopped or ``length`` tokens were made.
    """
    stop = [s for s in (stop or []) if s]
    if len(context) + length - 1 > model.config.n_ctx:
        raise ValueError(f"context of {len(context)} tokens + length {length} exceeds n_ctx "
                         f"{model.config.n_ctx}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([context] * n, dtype=torch.long, device=device)
        logits, past = model(x, use_cache=True, last_only=True)
        tokens: list[list[int]] = [[] for _ in range(n)]
        texts: list[str | None] = [None] * n
        alive = list(range(n))  # rows still generating, in batch order
        for step in range(length):
            new = next_token(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            keep = []
            for j, (row, token) in enumerate(zip(alive, new.tolist())):
                tokens[row].append(token)
                if stop:
                    text = enc.decode(tokens[row])
                    cut = cut_at_stop(text, stop)
                    if cut is not None:
                        texts[row] = text[:cut]
                        continue
                keep.append(j)
            if not keep or step == length - 1:
                break
            if len(keep) < len(alive):  # finished rows leave the batch and its cache
                index = torch.tensor(keep, device=device)
                new = new[index]
                past = [(k[index], v[index]) for k, v in past]
                alive = [alive[j] for j in keep]
            logits, past = model(new[:, None], past=past, use_cache=True)
    finally:
        model.train(was_training)
    return [t if t is not None else enc.decode(tokens[i]) for i, t in enumerate(texts)]


# --- command line ------------------------------------------------------------------------

def read_prompts(path: str) -> list[str]:
    """Prompts from a file: JSON lines with a "prompt" field, or one prompt per line."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--prompts {file}: file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts {file}: not UTF-8 text ({e})") from None
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise UserError(f"--prompts {file}: no prompts in the file")
    if file.suffix != ".jsonl" and not all(line.lstrip().startswith("{") for _, line in numbered):
        return [line for _, line in numbered]
    prompts = []
    for i, line in numbered:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts {file}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise UserError(f'--prompts {file}:{i}: expected an object with a "prompt" string')
        prompts.append(obj["prompt"])
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
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
                        "probability is <= p (1: no limit)")
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
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    args = p.parse_args(argv)

    for flag in ("nsamples", "batch_size", "length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
    check_sampling_flags(args)
    args.stop = [unescape(s) for s in args.stop]
    prompts = args.prompt + (read_prompts(args.prompts) if args.prompts else [])
    conditional = bool(prompts)
    prompts = prompts or [""]
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name")

    from .checkpoint import atomic_write, load_model
    from .encoder import load_encoder

    model_dir = find_model_dir(args.model_dir)
    device = device_arg(args.device)
    enc = load_encoder(model_dir)
    model = load_model(model_dir, device=device)
    if enc.eot_token is None and not all(prompts):
        raise UserError(f"{model_dir}: the tokenizer has no <|endoftext|> token to start "
                        "unconditional samples from; give --prompt or --prompts")
    n_ctx = model.config.n_ctx
    length = args.length or n_ctx // 2
    if length > n_ctx:
        raise UserError(f"--length {length} is larger than the model's n_ctx {n_ctx}")
    generator = torch.Generator(device=device)
    seed = generator.manual_seed(args.seed).initial_seed() if args.seed is not None \
        else generator.seed()
    settings = {"model": str(model_dir), "length": length, "temperature": args.temperature,
                "top_k": args.top_k, "top_p": args.top_p, "seed": seed, "stop": args.stop}
    jsonl = out is not None and out.suffix == ".jsonl"

    def run(write) -> None:
        bar = tqdm(total=len(prompts) * args.nsamples, desc="generating", unit="sample",
                   disable=None if out is not None else True)  # not over samples on stdout
        for number, prompt in enumerate(prompts, 1):
            ids = enc.encode(prompt) if conditional and prompt else [enc.eot_token]
            ids = _fit(ids, length, n_ctx, number)
            shown = enc.decode(ids) if conditional and prompt else ""
            done = 0
            while done < args.nsamples:
                n = min(args.batch_size, args.nsamples - done)
                texts = generate_batch(model, enc, ids, n, length, args.temperature, args.top_k,
                                       args.top_p, args.stop, generator)
                for text in texts:
                    record = {"prompt": shown if conditional else None,
                              "sample": shown + text if args.include_prompt else text,
                              "index": done, "settings": settings}
                    write(_format(record, jsonl))
                    done += 1
                bar.update(n)
        bar.close()

    if out is None:
        run(lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        return 0

    def to_file(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            run(f.write)

    atomic_write(out, to_file)
    print(f"wrote {len(prompts) * args.nsamples} samples to {out}", file=sys.stderr)
    return 0
