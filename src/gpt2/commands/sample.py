"""The two sampling scripts of the original release, with their flags and output format.

    python3 src/generate_unconditional_samples.py --model_name 124M --top_k 40 --nsamples 4
    python3 src/interactive_conditional_samples.py --model_dir out/my-model --length 100
    gpt2 sample ... / gpt2 interact ...                   # the same, through the one CLI

Both print each sample after ``=== SAMPLE n ===`` banners exactly as OpenAI's scripts did, so
tools that parse their output keep working. Fixed on purpose: unconditional sampling with
``--batch_size`` > 1 counts its samples correctly (the original stopped early), temperature 0 is
greedy, a long prompt is left-truncated with a warning instead of overrunning ``n_ctx``, and
EOF or Ctrl-C at the prompt ends quietly with exit status 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..flags import ArgumentParser
from ..errors import UserError
from ..files.paths import resolve_model_dir
from ..sampling import sample_sequence
from ..io.inference import load_for_inference
from .common import add_dtype_argument, check_sampling_flags, generator_for

PROMPT = "Model prompt >>> "


def _banner(n: int) -> str:
    return "=" * 40 + " SAMPLE " + str(n) + " " + "=" * 40


def _optional_int(text: str) -> int | None:
    # python-fire parsed values as Python literals, so `--length=None` was valid: keep it valid.
    return None if text == "None" else int(text)


def _parser(prog: str, description: str, nsamples: int, nsamples_help: str, length_help: str
            ) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name", default="124M", help="released model under --models_dir")
    p.add_argument("--models_dir", default="models",
                   help="directory of model folders (~ and $VARS are expanded)")
    p.add_argument("--model_dir", default=None,
                   help="any model directory (release, Hugging Face or ours); overrides "
                        "--model_name and --models_dir")
    p.add_argument("--seed", type=_optional_int, default=None,
                   help="random seed: the same seed prints the same samples")
    p.add_argument("--nsamples", type=int, default=nsamples, help=nsamples_help)
    p.add_argument("--batch_size", type=_optional_int, default=1,
                   help="samples generated in parallel")
    p.add_argument("--length", type=_optional_int, default=None, help=length_help)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits; lower is more conservative, 0 is greedy")
    p.add_argument("--top_k", type=int, default=0,
                   help="sample among the k most likely tokens (0: no limit; 40 is a good value)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling: keep the most likely tokens whose cumulative "
                        "probability is <= p (0 or 1: no limit)")
    p.add_argument("--device", default=None,
                   help="torch device; None: cuda if available, else cpu")
    add_dtype_argument(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_size is None:
        args.batch_size = 1
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.nsamples < 0:
        raise UserError(f"--nsamples must be >= 0, got {args.nsamples}")
    if args.length is not None and args.length < 1:
        raise UserError(f"--length must be >= 1, got {args.length}")
    check_sampling_flags(args)


def _load(args: argparse.Namespace):
    """(model, encoder, generator) for the parsed flags."""
    model_dir = resolve_model_dir(args.model_name, models_dir=args.models_dir,
                                  model_dir=args.model_dir)
    model, enc, device, _ = load_for_inference(model_dir, args.device, args.dtype)
    return model, enc, generator_for(device, args.seed)


def _sample(model, args, context: torch.Tensor, length: int, generator) -> torch.Tensor:
    """The new tokens only, [B, length]."""
    out = sample_sequence(model, length, context, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, generator=generator,
                          progress=None)
    return out[:, context.size(1):].cpu()


def unconditional_main(argv: list[str] | None = None) -> int:
    """``generate_unconditional_samples.py``: samples that start from <|endoftext|>."""
    p = _parser("generate_unconditional_samples.py",
                "Print samples generated from nothing (each row starts from <|endoftext|>).",
                nsamples=0, nsamples_help="number of samples; 0 runs forever",
                length_help="tokens per sample; None: the model's n_ctx")
    args = p.parse_args(argv)
    _check_args(args)
    model, enc, generator = _load(args)
    n_ctx = model.config.n_ctx
    length = n_ctx if args.length is None else args.length
    if length > n_ctx:
        raise UserError(f"--length {length} is longer than the model's n_ctx {n_ctx}")
    if enc.eot_token is None:
        raise UserError("the model's tokenizer has no <|endoftext|> token, which unconditional "
                        "samples start from; use interactive_conditional_samples.py")

    generated = 0
    while args.nsamples == 0 or generated < args.nsamples:
        # The last batch shrinks to what is still wanted: --nsamples is exact.
        batch = args.batch_size if args.nsamples == 0 else min(args.batch_size,
                                                                args.nsamples - generated)
        context = torch.full((batch, 1), enc.eot_token, dtype=torch.long)
        for row in _sample(model, args, context, length, generator):
            generated += 1
            print(_banner(generated))
            print(enc.decode(row.tolist()), flush=True)
    return 0


def _read_prompt() -> str | None:
    """The next non-empty prompt, or None at end of input."""
    while True:
        try:
            text = input(PROMPT)
        except EOFError:
            print()  # leave the shell's prompt on a line of its own
            return None
        if text:
            return text
        print("Prompt should not be empty!")


def interactive_main(argv: list[str] | None = None) -> int:
    """``interactive_conditional_samples.py``: continue prompts typed at ``Model prompt >>>``."""
    p = _parser("interactive_conditional_samples.py",
                "Continue prompts typed at a prompt; Ctrl-D (EOF) or Ctrl-C quits.",
                nsamples=1, nsamples_help="samples per prompt (a multiple of --batch_size)",
                length_help="tokens per sample; None: half the model's n_ctx")
    args = p.parse_args(argv)
    _check_args(args)
    if args.nsamples < 1:
        raise UserError(f"--nsamples must be >= 1, got {args.nsamples}")
    if args.nsamples % args.batch_size:
        raise UserError(f"--nsamples {args.nsamples} must be a multiple of --batch_size "
                        f"{args.batch_size}")
    model, enc, generator = _load(args)
    n_ctx = model.config.n_ctx
    length = n_ctx // 2 if args.length is None else args.length
    if length > n_ctx:
        raise UserError(f"--length {length} is longer than the model's n_ctx {n_ctx}")
    max_prompt = n_ctx + 1 - length  # the last sampled token is never fed back

    try:
        while (text := _read_prompt()) is not None:
            tokens = enc.encode(text)
            if not tokens:
                print("Prompt should not be empty!")
                continue
            if len(tokens) > max_prompt:
                print(f"warning: the prompt has {len(tokens)} tokens; only its last "
                      f"{max_prompt} are used (n_ctx {n_ctx} - --length {length} + 1)",
                      file=sys.stderr)
                tokens = tokens[-max_prompt:]
            context = torch.tensor([tokens] * args.batch_size, dtype=torch.long)
            generated = 0
            for _ in range(args.nsamples // args.batch_size):
                for row in _sample(model, args, context, length, generator):
                    generated += 1
                    print(_banner(generated))
                    print(enc.decode(row.tolist()), flush=True)
            print("=" * 80, flush=True)
    except KeyboardInterrupt:
        print()
    return 0
