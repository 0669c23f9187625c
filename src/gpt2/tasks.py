"""Benchmark tasks scored as their reference implementations score them.

    rows = read_hellaswag("hellaswag_val.jsonl")            # rowanz's jsonl, checked
    scores = score_hellaswag(model, encoder, rows)           # {"acc": ..., "acc_norm": ...}
    read, score = TASKS["lambada"]                           # by --task name

**LAMBADA** (OpenAI's ``lambada_test.jsonl``, as lm-evaluation-harness's ``lambada_openai``):
the context is the text without its last word, the target ``" " + last word``, tokenized as
the harness's Hugging Face backend does (the whole text, then cut after the context's
tokens). ``acc``: every target token is the greedy prediction; ``perplexity``: exp of minus
the mean (over examples) of the target's summed log-likelihood.

**HellaSwag** (completion style, as build-nanogpt's and llm.c's ``hellaswag.py``): each of the
four endings is appended to the context as ``" " + ending``; the model's next-token loss is
summed over the ending's tokens only. ``acc``: the ending of lowest summed loss is the label;
``acc_norm``: lowest mean loss per ending token. (lm-evaluation-harness's ``hellaswag``
normalizes by characters and preprocesses the text: other numbers, 0.3114 against 0.2955
acc_norm for GPT-2 124M.)
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data.examples import records
from .errors import UserError


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _records(path: Path, limit: int | None):
    """(record, "file:line") of a task's file (the readers of example datasets: .jsonl,
    compressed too), the first ``limit`` only; a record that is not an object is one line."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    for row, where in itertools.islice(records(path), limit):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        yield row, where


def read_lambada(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """LAMBADA's records (``text``), checked: each must hold at least two words."""
    rows = []
    for row, where in _records(Path(path), limit):
        text = row.get("text")
        if not isinstance(text, str) or len(text.split(" ")) < 2:
            raise UserError(f"{where}: 'text' must be a string of at least two words")
        rows.append({"text": text})
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def _chunks(rows: list, batch_size: int, desc: str, progress: bool | None):
    """``rows`` in chunks of ``batch_size``, with a progress bar (on a terminal by default)."""
    bar = tqdm(total=len(rows), desc=desc, unit="example",
               disable=progress is False or (progress is None and not os.isatty(2)))
    for i in range(0, len(rows), batch_size):
        yield rows[i:i + batch_size]
        bar.update(min(batch_size, len(rows) - i))
    bar.close()


def _padded(seqs: list[list[int]]) -> torch.Tensor:
    """Rows of ids, right-padded with 0 (causal attention: padding never reaches a row's own
    positions, and nothing reads its outputs)."""
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for r, ids in enumerate(seqs):
        tokens[r, :len(ids)] = torch.tensor(ids)
    return tokens


def _encode_pair(encoder, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split (HFLM._encode_pair): trailing spaces of the context move to the
    continuation; the continuation's ids are the whole text's after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encoder.encode(context + continuation), encoder.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def score_lambada(model, encoder, rows: list[dict], batch_size: int = 8,
                  progress: bool | None = None) -> dict:
    """acc and perplexity of the last words (see the module docstring)."""
    device = next(model.parameters()).device
    n_ctx = model.config.n_ctx
    lls, greedy = [], []
    for chunk in _chunks(rows, batch_size, "lambada", progress):
        seqs, targets = [], []
        for row in chunk:
            words = row["text"].split(" ")
            ctx, cont = _encode_pair(encoder, " ".join(words[:-1]), " " + words[-1])
            if not ctx and encoder.eot_token is None:
                raise UserError("a LAMBADA text with an empty context needs a tokenizer with "
                                "<|endoftext|> to start from")
            ctx = ctx or [encoder.eot_token]
            seqs.append((ctx + cont)[-(n_ctx + 1):][:-1])
            targets.append(cont)
        tokens = _padded(seqs)
        logprobs = F.log_softmax(model(tokens.to(device)).float(), dim=-1).cpu()
        for r, (ids, cont) in enumerate(zip(seqs, targets)):
            rows_lp = logprobs[r, len(ids) - len(cont):len(ids)]
            want = torch.tensor(cont)
            lls.append(float(rows_lp.gather(1, want[:, None]).sum()))
            greedy.append(bool((rows_lp.argmax(-1) == want).all()))
    n = len(rows)
    return {"task": "lambada", "examples": n, "acc": sum(greedy) / n, "correct": sum(greedy),
            "perplexity": math.exp(-sum(lls) / n)}


def read_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The records of a HellaSwag jsonl file (``ctx``, four ``endings``, ``label``), checked:
    a record that is not one is one line naming the file and line."""
    rows = []
    for row, where in _records(Path(path), limit):
        ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
        if not isinstance(ctx, str):
            raise UserError(f"{where}: 'ctx' must be a string")
        if (not isinstance(endings, list) or len(endings) != 4
                or not all(isinstance(e, str) for e in endings)):
            raise UserError(f"{where}: 'endings' must be a list of 4 strings")
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
            raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3")
        rows.append({"ctx": ctx, "endings": endings, "label": label})
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def _ending_losses(model, rows: list[list[int]], starts: list[int], device) -> torch.Tensor:
    """[R, 2]: summed and mean next-token loss of tokens ``starts[r]:`` of each row."""
    tokens = _padded(rows)
    mask = torch.zeros(tokens.shape)
    for r, (ids, start) in enumerate(zip(rows, starts)):
        mask[r, start:len(ids)] = 1
    tokens, mask = tokens.to(device), mask.to(device)
    logits = model(tokens).float()
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                             tokens[:, 1:].reshape(-1), reduction="none").view(len(rows), -1)
    losses = losses * mask[:, 1:]
    total = losses.sum(1)
    return torch.stack([total, total / mask[:, 1:].sum(1)], dim=1)


@torch.no_grad()
def score_hellaswag(model, encoder, rows: list[dict], batch_size: int = 8,
                    progress: bool | None = None) -> dict:
    """acc and acc_norm over ``rows`` (``batch_size`` examples, 4 rows each, per forward)."""
    device = next(model.parameters()).device
    n_ctx = model.config.n_ctx
    correct = correct_norm = 0
    for chunk in _chunks(rows, batch_size, "hellaswag", progress):
        ids, starts = [], []
        for row in chunk:
            ctx = encoder.encode(row["ctx"])
            for ending in row["endings"]:
                end = encoder.encode(" " + ending)
                full = (ctx + end)[-n_ctx:]  # (a context longer than n_ctx keeps its end)
                ids.append(full)
                starts.append(len(full) - len(end))
        scores = _ending_losses(model, ids, starts, device).view(len(chunk), 4, 2).cpu()
        for row, s in zip(chunk, scores):
            correct += int(s[:, 0].argmin()) == row["label"]
            correct_norm += int(s[:, 1].argmin()) == row["label"]
    n = len(rows)
    return {"task": "hellaswag", "examples": n, "acc": correct / n, "acc_norm": correct_norm / n,
            "correct": correct, "correct_norm": correct_norm}


# --task name -> (read the data file, score a model on its rows)
TASKS = {"hellaswag": (read_hellaswag, score_hellaswag), "lambada": (read_lambada, score_lambada)}
