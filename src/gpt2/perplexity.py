"""Loss and perplexity of a model on a dataset, and "did fine-tuning do anything?" side by side.

    gpt2 evaluate checkpoint/run1 --dataset data/test.txt
    gpt2 evaluate checkpoint/run1 --dataset data/corpus --stride 512   # uses corpus/test/
    gpt2 evaluate checkpoint/run1 --dataset data/test.txt --compare models/124M   (the command)

    from gpt2.perplexity import evaluate
    result = evaluate(model, chunks)          # {"loss": 3.1, "perplexity": 22.2, "tokens": 12345, ...}

How tokens are counted. Each chunk (a document group, as
:func:`gpt2.data.dataset.load_dataset` makes them) is scored on its own: windows never cross a
chunk boundary, and a chunk's first token is never scored because nothing precedes it. Windows
of ``n_ctx`` tokens start at 0, ``stride``, ``2 * stride``, ... and each one scores only the
tokens the previous window did not score, with every token before them in the window as
context (Hugging Face's sliding-window perplexity).

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

import math

import numpy as np
import torch
from tqdm import tqdm

from .io.tensors import unwrap
from .model import token_loss
from .quant import head_weight
from .runtime import PRECISIONS, autocast

# Rows of [*, n_vocab] logits materialised at once: bounds memory to ~400 MB for GPT-2's vocabulary.
HEAD_ROWS = 2048


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, chunks, n_ctx: int | None = None,
             stride: int | None = None, batch_size: int = 8, precision: str = "fp32",
             progress: bool | None = None) -> dict:
    """Mean loss and perplexity of ``model`` over ``chunks`` (1-D token arrays or lists).

    ``n_ctx`` defaults to the model's context, ``stride`` to ``n_ctx`` (non-overlapping
    windows); see the module docstring for exactly which tokens are scored. Returns
    ``{"loss", "perplexity", "tokens", "windows"}``. Runs on the model's device, in eval mode.
    """
    gpt = unwrap(model)
    n_ctx = n_ctx or gpt.config.n_ctx
    if not 1 <= n_ctx <= gpt.config.n_ctx:
        raise ValueError(f"n_ctx must be in [1, {gpt.config.n_ctx}] (the model's context), "
                         f"got {n_ctx}")
    stride = stride or n_ctx
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = [(c, *w) for c, chunk in enumerate(chunks) for w in windows(len(chunk), n_ctx, stride)]
    total = sum(end - first for _, _, end, first in plan)
    if total == 0:
        raise ValueError("nothing to score: every chunk is shorter than 2 tokens")

    device = next(gpt.parameters()).device
    was_training = gpt.training
    gpt.eval()
    head = head_weight(gpt)  # an int8 head's fp32 copy is made once, not per batch
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
                nll += token_loss(h, head, targets, chunk=HEAD_ROWS,
                                  reduction="sum").item()
            bar.update(len(targets))
    finally:
        bar.close()
        gpt.train(was_training)
    loss = nll / total
    return {"loss": loss, "perplexity": exp_or_inf(loss), "tokens": total, "windows": len(plan)}


def exp_or_inf(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")
