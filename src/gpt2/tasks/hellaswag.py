"""HellaSwag (rowanz's ``hellaswag_val.jsonl``), completion style as build-nanogpt's and
llm.c's ``hellaswag.py``: each of the four endings is appended to the context as ``" " +
ending`` and the model's log-likelihood is summed over the ending's tokens only. ``acc``: the
ending of highest summed log-likelihood (lowest summed loss) is the label; ``acc_norm``: the
highest mean per ending token. (lm-evaluation-harness's ``hellaswag`` normalizes by
characters and preprocesses the text: other numbers, 0.3114 against 0.2955 acc_norm for GPT-2
124M.)
"""

from __future__ import annotations

import os
from typing import Callable

from ..data.records import describe
from ..errors import UserError
from .scoring import continuation_scores, task_records
from .task import DataFile, Task


def read_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The records of a HellaSwag jsonl file (``ctx``, four ``endings``, ``label``), checked:
    a record that is not one is one line naming the file and line."""
    rows = []
    for row, where in task_records(path, limit):
        ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
        if not isinstance(ctx, str):
            raise UserError(f"{where}: 'ctx' must be a string")
        if (not isinstance(endings, list) or len(endings) != 4
                or not all(isinstance(e, str) for e in endings)):
            raise UserError(f"{where}: 'endings' must be a list of 4 strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
            raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3 (a number), not "
                            f"{describe(label)}")
        rows.append({"ctx": ctx, "endings": endings, "label": label})
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def hellaswag_sums(model, encoder, rows: list[dict], batch_size: int = 8,
                   progress: bool | None = None, stop: Callable[[], bool] | None = None) -> dict:
    """Examples whose label has the highest summed / mean ending log-likelihood
    (``batch_size`` examples, 4 rows each, per forward)."""
    n_ctx = model.config.n_ctx
    pairs = []
    for row in rows:
        ctx = encoder.encode(row["ctx"])
        pairs += [(ctx, encoder.encode(" " + ending)[-n_ctx:]) for ending in row["endings"]]
    scores = continuation_scores(model, pairs, batch_size * 4, "hellaswag", progress, stop,
                                 per_example=4)
    correct = correct_norm = 0
    for k, row in enumerate(rows):
        sums = [scores[4 * k + e][0] for e in range(4)]
        means = [s / len(pairs[4 * k + e][1]) for e, s in enumerate(sums)]
        correct += max(range(4), key=sums.__getitem__) == row["label"]
        correct_norm += max(range(4), key=means.__getitem__) == row["label"]
    return {"examples": len(rows), "correct": correct, "correct_norm": correct_norm}


def hellaswag_metrics(sums: dict) -> dict:
    n = sums["examples"]
    return {"acc": sums["correct"] / n, "acc_norm": sums["correct_norm"] / n}


TASK = Task(
    "hellaswag", read_hellaswag, hellaswag_sums, hellaswag_metrics, ("acc", "acc_norm"),
    DataFile("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
             "hellaswag_val.jsonl", "hellaswag_val.jsonl", 12246618,
             "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"),
    about="hellaswag's acc and acc_norm as build-nanogpt's hellaswag.py",
    rows_per_example=4, in_training=True)
