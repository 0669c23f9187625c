"""Loss and perplexity of a model on a dataset, and "did fine-tuning do anything?" side by side.

    gpt2 evaluate checkpoint/run1 --dataset data/test.txt
    gpt2 evaluate checkpoint/run1 --dataset data/corpus --stride 512   # uses corpus/test/
    gpt2 evaluate checkpoint/run1 --dataset data/test.txt --compare models/124M

    from gpt2.evaluate import evaluate
    result = evaluate(model, chunks)          # {"loss": 3.1, "perplexity": 22.2, "tokens": 12345, ...}

How tokens are counted. Each chunk (a document group, as :func:`gpt2.dataset.load_dataset` makes
them) is scored on its own: windows never cross a chunk boundary, and a chunk's first token is
never scored because nothing precedes it. Windows of ``n_ctx`` tokens start at 0, ``stride``,
``2 * stride``, ... and each one scores only the tokens the previous window did not score, with
every token before them in the window as context (Hugging Face's sliding-window perplexity).

- Default (``stride = n_ctx``): non-overlapping windows, as training and validation see the
  data; a window of ``n`` tokens scores ``n - 1`` of them (its first token has no context), so a
  chunk of ``L`` tokens scores ``L - ceil(L / n_ctx)``.
- ``stride < n_ctx``: every token but the chunk's first is scored exactly once, ``L - 1`` per
  chunk, each with at least ``n_ctx - stride`` tokens of context (except near the chunk's
  start). Smaller strides give lower, fairer perplexities and cost ``n_ctx / stride`` times more.

The loss is the mean negative log-likelihood (natural log) over all scored tokens, weighted per
token (not per window); perplexity is ``exp(loss)``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import UserError

# Rows of [*, n_vocab] logits materialised at once: bounds memory to ~400 MB for GPT-2's vocabulary.
HEAD_ROWS = 2048
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def windows(length: int, n_ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a chunk of ``length`` tokens: (begin, end, first scored position) each.

    Tokens ``begin:end`` are fed to the model and positions ``first:end`` are scored (each
    predicted from everything before it in the window). Windows that would score nothing are
    left out.
    """
    if not 1 <= stride <= n_ctx:
        raise ValueError(f"stride must be in [1, n_ctx={n_ctx}], got {stride}")
    out, begin, scored_to = [], 0, 0
    while True:
        end = min(begin + n_ctx, length)
        first = max(scored_to, begin + 1)
        if end > first:
            out.append((begin, end, first))
        if end >= length:
            return out
        scored_to = end
        begin += stride


def autocast(device: torch.device, precision: str):
    """Mixed precision for a forward pass; fp32 is a no-op."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


@torch.no_grad()
def evaluate(model: torch.nn.Module, chunks, n_ctx: int | None = None,
             stride: int | None = None, batch_size: int = 8, precision: str = "fp32",
             progress: bool | None = None) -> dict:
    """Mean loss and perplexity of ``model`` over ``chunks`` (1-D token arrays or lists).

    ``n_ctx`` defaults to the model's context, ``stride`` to ``n_ctx`` (non-overlapping
    windows); see the module docstring for exactly which tokens are scored. Returns
    ``{"loss", "perplexity", "tokens", "windows"}``. Runs on the model's device, in eval mode.
    """
    from .checkpoint import unwrap

    gpt = unwrap(model)
    n_ctx = n_ctx or gpt.config.n_ctx
    if not 1 <= n_ctx <= gpt.config.n_ctx:
        raise ValueError(f"n_ctx must be in [1, {gpt.config.n_ctx}] (the model's context), "
                         f"got {n_ctx}")
    stride = stride or n_ctx
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = [(c, *w) for c, chunk in enumerate(chunks) for w in windows(len(chunk), n_ctx, stride)]
    total = sum(end - first for _, _, end, first in plan)
    if total == 0:
        raise ValueError("nothing to score: every chunk is shorter than 2 tokens")

    device = next(gpt.parameters()).device
    was_training = gpt.training
    gpt.eval()
    nll, bar = 0.0, tqdm(total=total, desc="evaluating", unit="tok", unit_scale=True,
                         disable=None if progress is None else not progress)
    try:
        for i in range(0, len(plan), batch_size):
            batch = plan[i:i + batch_size]
            width = max(end - begin for _, begin, end, _ in batch)
            # Right padding is harmless: attention is causal, so pads only follow real tokens.
            x = np.zeros((len(batch), width), dtype=np.int64)
            rows, cols = [], []
            for r, (c, begin, end, first) in enumerate(batch):
                x[r, :end - begin] = chunks[c][begin:end]
                rows += [r] * (end - first)
                cols += range(first - begin, end - begin)
            bad = x[(x < 0) | (x >= gpt.config.n_vocab)]
            if bad.size:
                raise ValueError(f"token id {int(bad[0])} is outside the model's vocabulary "
                                 f"of {gpt.config.n_vocab}; was the data encoded for another "
                                 "model?")
            x = torch.from_numpy(x).to(device)
            rows = torch.tensor(rows, device=device)
            cols = torch.tensor(cols, device=device)
            with autocast(device, precision):
                h, _ = gpt.hidden_states(x)
                # Position p is predicted by the state at p - 1; only scored rows reach the head.
                h, targets = h[rows, cols - 1], x[rows, cols]
                for j in range(0, len(targets), HEAD_ROWS):
                    logits = gpt.lm_head(h[j:j + HEAD_ROWS]).float()
                    nll += F.cross_entropy(logits, targets[j:j + HEAD_ROWS],
                                           reduction="sum").item()
            bar.update(len(targets))
    finally:
        bar.close()
        gpt.train(was_training)
    loss = nll / total
    return {"loss": loss, "perplexity": _exp(loss), "tokens": total, "windows": len(plan)}


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


# --- command line ------------------------------------------------------------------------

def _dataset_path(text: str) -> str | Path:
    """The file/dir/glob to evaluate: a corpus directory means its test/ (else valid/) split."""
    from .dataset import find_corpus_splits

    splits = find_corpus_splits(text)
    if splits is None:
        return text  # a glob stays a glob
    for name in ("test", "valid"):
        if splits.get(name) is not None:
            print(f"evaluating the {name} split of corpus {text}: {splits[name]}", file=sys.stderr)
            return Path(splits[name])
    raise UserError(f"--dataset {text}: corpus directory has no test/ or valid/ split "
                    "(evaluating on training data would say nothing)")


def _samples(model, enc, prompts: list[str], length: int, seed: int) -> list[str]:
    from .sample import sample_sequence

    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = enc.encode(prompt) if prompt else [enc.eot_token]
        if None in ids:
            raise UserError("an empty --prompt needs a tokenizer with <|endoftext|>")
        ids = ids[-(model.config.n_ctx + 1 - length):]
        context = torch.tensor([ids], device=device)
        tokens = sample_sequence(model, length, context, top_k=40, seed=seed)
        out.append(enc.decode(tokens[0, len(ids):].tolist()))
    return out


def _row(label: str, values: list[str], width: int) -> str:
    return f"{label:<12}" + "".join(f"  {v:>{width}}" for v in values)


def main(argv: list[str] | None = None) -> int:
    from .generate import HelpFormatter

    p = argparse.ArgumentParser(
        prog="gpt2 evaluate", formatter_class=HelpFormatter,
        description="Mean loss and perplexity of a model over a whole dataset.")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="model directory (ours, release or Hugging Face) or a released name")
    p.add_argument("--dataset", required=True,
                   help="text file, directory, glob, .npz or .bin; a corpus directory with a "
                        "test/ folder means that split")
    p.add_argument("--combine", type=int, default=50000,
                   help="minimum characters per chunk when encoding text (as in training)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the dataset files")
    p.add_argument("--n_ctx", type=int, default=None,
                   help="window length in tokens (default: the model's n_ctx)")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window step; each window scores only tokens the previous one "
                        "did not (default: n_ctx, non-overlapping windows)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="autocast precision of the forward pass")
    p.add_argument("--compare", metavar="OTHER_DIR", default=None,
                   help="also evaluate this model (e.g. the base you fine-tuned from) and print "
                        "both side by side, with samples for fixed prompts")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt for the --compare samples (repeatable; default: unconditional "
                        "and the first tokens of the dataset)")
    p.add_argument("--sample_length", type=int, default=60, help="tokens per --compare sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the --compare samples")
    args = p.parse_args(argv)

    from .checkpoint import load_config, load_model
    from .dataset import load_dataset
    from .encoder import encoder_fingerprint, load_encoder
    from .generate import device_arg, find_model_dir

    for flag in ("n_ctx", "stride", "batch_size", "sample_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
    device = device_arg(args.device)
    dirs = [find_model_dir(args.model_dir)]
    if args.compare:
        dirs.insert(0, find_model_dir(args.compare))  # the base goes in the left column
        if encoder_fingerprint(dirs[0]) != encoder_fingerprint(dirs[1]):
            raise UserError(f"--compare {args.compare}: its tokenizer differs from "
                            f"{args.model_dir}'s, so their losses are not comparable")
    # Both models see the same windows, or their numbers could not be compared.
    max_ctx = min(load_config(d).n_ctx for d in dirs)
    n_ctx = args.n_ctx or max_ctx
    if n_ctx > max_ctx:
        raise UserError(f"--n_ctx {n_ctx} is larger than the model's context of {max_ctx} tokens")
    if args.stride is not None and args.stride > n_ctx:
        raise UserError(f"--stride {args.stride} is larger than the window ({n_ctx} tokens)")

    enc = load_encoder(dirs[-1])
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the results
        chunks = load_dataset(_dataset_path(args.dataset), enc, combine=args.combine,
                              encoding=args.encoding)
    print(f"scoring {sum(map(len, chunks))} tokens in {len(chunks)} chunks: windows of {n_ctx} "
          f"tokens, stride {args.stride or n_ctx}", file=sys.stderr)
    prompts = args.prompt
    if prompts is None:
        first = next((c for c in chunks if len(c)), [])
        prompts = ([""] if enc.eot_token is not None else []) + \
            [enc.decode([int(t) for t in first[:16]])]

    results, samples = [], []
    for d in dirs:
        model = load_model(d, device=device)
        try:
            results.append(evaluate(model, chunks, n_ctx=n_ctx, stride=args.stride,
                                    batch_size=args.batch_size, precision=args.precision))
        except ValueError as e:
            raise UserError(f"--dataset {args.dataset}: {e}") from None
        if args.compare:
            length = min(args.sample_length, model.config.n_ctx)
            samples.append(_samples(model, enc, prompts, length, args.seed))
        del model

    if not args.compare:
        r = results[0]
        print(f"loss = {r['loss']:.4f}")
        print(f"perplexity = {r['perplexity']:.4f}")
        print(f"tokens = {r['tokens']}")
        return 0
    names = [str(d) for d in dirs]
    width = max(12, *map(len, names))
    print(_row("", names, width))
    print(_row("loss", [f"{r['loss']:.4f}" for r in results], width))
    print(_row("perplexity", [f"{r['perplexity']:.4f}" for r in results], width))
    print(_row("tokens", [str(r["tokens"]) for r in results], width))
    delta = results[1]["loss"] - results[0]["loss"]
    print(f"{names[1]} vs {names[0]}: loss {delta:+.4f}, perplexity "
          f"x{_exp(delta):.3f} (top_k 40 samples below, seed {args.seed})")
    for i, prompt in enumerate(prompts):
        shown = prompt if prompt else "<|endoftext|> (unconditional)"
        print(f"\n{'=' * 20} prompt {i + 1}: {shown!r} {'=' * 20}")
        for name, texts in zip(names, samples):
            print(f"{'-' * 10} {name} {'-' * 10}\n{texts[i]}")
    return 0

