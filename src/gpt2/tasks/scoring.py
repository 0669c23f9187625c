"""lm-evaluation-harness's two scoring rules, which every task here and :mod:`gpt2.lm_eval`
share: a continuation's log-likelihood given its context, and every token of a text scored
once in windows of the model's context.

    pairs = [encode_pair(enc, "The cat sat on the", " mat")]
    [(loglikelihood, greedy)] = continuation_scores(model, pairs)
    windows = rolling_windows(enc.encode(text), enc.eot_token, model.config.n_ctx)
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.records import records
from ..errors import UserError


class Stopped(Exception):
    """A scoring pass ended early because its ``stop()`` said so (Ctrl-C in training)."""


def task_records(path: str | os.PathLike, limit: int | None):
    """(record, "file:line") of a task's file (the one reader of records: .jsonl, compressed
    too), the first ``limit`` only; each must be a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    for row, where in itertools.islice(records(path, complete=True), limit):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        yield row, where


def in_chunks(rows: list, batch_size: int, desc: str, progress: bool | None,
              stop: Callable[[], bool] | None = None, per_example: int = 1):
    """``rows`` in chunks of ``batch_size``, with a progress bar counting examples of
    ``per_example`` rows (on a terminal by default); :class:`Stopped` is raised before a chunk
    when ``stop()`` is true."""
    bar = tqdm(total=len(rows) // per_example, desc=desc, unit="example",
               disable=progress is False or (progress is None and not os.isatty(2)))
    for i in range(0, len(rows), batch_size):
        if stop is not None and stop():
            bar.close()
            raise Stopped
        yield rows[i:i + batch_size]
        bar.update(min(batch_size, len(rows) - i) / per_example)
    bar.close()


def padded(seqs: list[list[int]]) -> torch.Tensor:
    """Rows of ids, right-padded with 0 (causal attention: padding never reaches a row's own
    positions, and nothing reads its outputs)."""
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for r, ids in enumerate(seqs):
        tokens[r, :len(ids)] = torch.tensor(ids)
    return tokens


def encode_pair(encoder, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split (HFLM.encode_pair): trailing spaces of the context move to the
    continuation; the continuation's ids are the whole text's after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encoder.encode(context + continuation), encoder.encode(context)
    return ctx, whole[len(ctx):]


def context_ids(encoder, ctx: list[int], what: str) -> list[int]:
    """``ctx``, or <|endoftext|> for an empty one (as the harness starts an empty context)."""
    if ctx:
        return ctx
    if encoder.eot_token is None:
        raise UserError(f"{what} with an empty context needs a tokenizer with <|endoftext|> "
                        "to start from")
    return [encoder.eot_token]


@torch.no_grad()
def continuation_scores(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8,
                        desc: str = "scoring", progress: bool | None = None,
                        stop: Callable[[], bool] | None = None, per_example: int = 1
                        ) -> list[tuple[float, bool]]:
    """(summed log-likelihood, all greedy) of each continuation given its context, as
    lm-evaluation-harness's HF backend scores a ``loglikelihood`` request: the model sees
    ``(context + continuation)[-(n_ctx + 1):][:-1]`` and the continuation's tokens are read
    from the last positions. Longest first in batches of ``batch_size``, right-padded."""
    device = next(model.parameters()).device
    n_ctx = model.config.n_ctx
    longest = max((len(cont) for _, cont in pairs), default=0)
    if longest > n_ctx:
        raise UserError(f"a continuation of {longest} tokens does not fit the model's context "
                        f"of {n_ctx}")
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for chunk in in_chunks(order, batch_size, desc, progress, stop, per_example):
        seqs = [(pairs[i][0] + pairs[i][1])[-(n_ctx + 1):][:-1] for i in chunk]
        logits = model(padded(seqs).to(device))
        for r, i in enumerate(chunk):  # (on the device: only two numbers come back)
            cont, end = pairs[i][1], len(seqs[r])
            logprobs = F.log_softmax(logits[r, end - len(cont):end].float(), dim=-1)
            want = torch.tensor(cont, device=device)
            out[i] = (float(logprobs.gather(1, want[:, None]).sum()),
                      bool((logprobs.argmax(-1) == want).all()))
    return out


def rolling_windows(tokens: list[int], prefix: int, n_ctx: int
                    ) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of ``tokens`` once, as the
    harness's ``loglikelihood_rolling`` does (``get_rolling_token_windows`` with
    ``context_len=1``, made disjoint): windows of ``n_ctx`` predicted tokens, the first one
    predicted from ``prefix`` (<|endoftext|>), each later one from the token before it; a
    shorter last window is read with the tokens before it, to fill the model's window."""
    out = []
    for start in range(0, len(tokens), n_ctx):
        end = min(start + n_ctx, len(tokens))
        out.append((tokens[end - n_ctx - 1:start] if start else [prefix], tokens[start:end]))
    return out
