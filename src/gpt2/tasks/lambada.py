"""LAMBADA (OpenAI's ``lambada_test.jsonl``), scored as lm-evaluation-harness's
``lambada_openai``: the context is the text without its last word, the target ``" " + last
word``, tokenized as the harness's Hugging Face backend does (the whole text, then cut after
the context's tokens). ``acc``: every target token is the greedy prediction; ``perplexity``:
exp of minus the mean (over examples) of the target's summed log-likelihood.
"""

from __future__ import annotations

import math
import os
from typing import Callable

from ..errors import UserError
from .scoring import context_ids, continuation_scores, encode_pair, task_records
from .task import DataFile, Task


def read_lambada(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """LAMBADA's records (``text``), checked: each must hold at least two words."""
    rows = []
    for row, where in task_records(path, limit):
        text = row.get("text")
        if not isinstance(text, str) or len(text.split(" ")) < 2:
            raise UserError(f"{where}: 'text' must be a string of at least two words")
        rows.append({"text": text})
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def lambada_sums(model, encoder, rows: list[dict], batch_size: int = 8,
                 progress: bool | None = None, stop: Callable[[], bool] | None = None) -> dict:
    """Correct last words and their summed log-likelihood."""
    pairs = []
    for row in rows:
        words = row["text"].split(" ")
        ctx, cont = encode_pair(encoder, " ".join(words[:-1]), " " + words[-1])
        pairs.append((context_ids(encoder, ctx, "a LAMBADA text"), cont))
    scores = continuation_scores(model, pairs, batch_size, "lambada", progress, stop)
    return {"examples": len(rows), "correct": sum(greedy for _, greedy in scores),
            "loglikelihood": sum(ll for ll, _ in scores)}


def lambada_metrics(sums: dict) -> dict:
    n = sums["examples"]
    return {"acc": sums["correct"] / n, "perplexity": math.exp(-sums["loglikelihood"] / n)}


TASK = Task(
    "lambada", read_lambada, lambada_sums, lambada_metrics, ("acc", "perplexity"),
    DataFile("https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
             "lambada_test.jsonl", 1819752,
             "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"),
    about="lambada's last-word acc and perplexity as lm-evaluation-harness's lambada_openai",
    in_training=True)
