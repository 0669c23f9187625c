"""Benchmark tasks scored as their reference implementations score them.

    rows = read_hellaswag("hellaswag_val.jsonl")            # rowanz's jsonl, checked
    scores = score_hellaswag(model, encoder, rows)           # {"acc": ..., "acc_norm": ...}

**HellaSwag** (completion style, as build-nanogpt's and llm.c's ``hellaswag.py``): each of the
four endings is appended to the context as ``" " + ending``; the model's next-token loss is
summed over the ending's tokens only. ``acc``: the ending of lowest summed loss is the label;
``acc_norm``: lowest mean loss per ending token. (lm-evaluation-harness's ``hellaswag``
normalizes by characters and preprocesses the text: other numbers, 0.3114 against 0.2955
acc_norm for GPT-2 124M.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import UserError


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The records of a HellaSwag jsonl file (``ctx``, four ``endings``, ``label``), checked:
    a record that is not one is one line naming the file and line."""
    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not a JSON record ({e.msg}); a truncated "
                                    "download?") from None
                if not isinstance(row, dict):
                    raise UserError(f"{where}: expected a JSON object")
                ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
                if not isinstance(ctx, str):
                    raise UserError(f"{where}: 'ctx' must be a string")
                if (not isinstance(endings, list) or len(endings) != 4
                        or not all(isinstance(e, str) for e in endings)):
                    raise UserError(f"{where}: 'endings' must be a list of 4 strings")
                if isinstance(label, str) and label.isdigit():
                    label = int(label)
                if not isinstance(label, int) or isinstance(label, bool) or \
                        not 0 <= label < 4:
                    raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3")
                rows.append({"ctx": ctx, "endings": endings, "label": label})
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def _ending_losses(model, rows: list[list[int]], starts: list[int], device) -> torch.Tensor:
    """[R, 2]: summed and mean next-token loss of tokens ``starts[r]:`` of each row."""
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for r, (ids, start) in enumerate(zip(rows, starts)):
        tokens[r, :len(ids)] = torch.tensor(ids)
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
    bar = tqdm(total=len(rows), desc="hellaswag", unit="example",
               disable=progress is False or (progress is None and not os.isatty(2)))
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
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
        bar.update(len(chunk))
    bar.close()
    n = len(rows)
    return {"task": "hellaswag", "examples": n, "acc": correct / n, "acc_norm": correct_norm / n,
            "correct": correct, "correct_norm": correct_norm}
