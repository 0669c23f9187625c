"""Benchmark tasks scored as their reference implementations score them, one row each.

    task = TASKS["hellaswag"]                                 # a Task: reader, scorer, file
    rows = task.read("hellaswag_val.jsonl")                   # rowanz's jsonl, checked
    scores = task.score(model, encoder, rows)                 # {"acc": ..., "acc_norm": ...}
    path = download_task_data("lambada", "data")              # the published file, checked

Each module holds one benchmark and its :class:`~.task.Task` row: :mod:`.hellaswag` (as
build-nanogpt's), :mod:`.lambada` and :mod:`.wikitext` (as lm-evaluation-harness's);
:mod:`.scoring` has the harness's two scoring rules, which :mod:`gpt2.lm_eval` shares. A new
benchmark is a module with its row, added to :data:`TASKS`: the commands, the download, the
README table and training's evals take it from there.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..files.checksums import sha256_of
from ..files.download import download_checked
from . import hellaswag, lambada, wikitext
from .hellaswag import hellaswag_sums, read_hellaswag
from .lambada import lambada_sums, read_lambada
from .scoring import (Stopped, context_ids, continuation_scores, encode_pair, in_chunks,
                      rolling_windows)
from .task import DataFile, Task
from .wikitext import (WIKITEXT_MEMBERS, read_wikitext, wikitext_detokenize, wikitext_pages,
                       wikitext_sums)

TASKS: dict[str, Task] = {t.name: t for t in (hellaswag.TASK, lambada.TASK, *wikitext.TASKS)}

__all__ = ["TASKS", "DataFile", "Stopped", "Task", "WIKITEXT_MEMBERS", "context_ids",
           "continuation_scores", "data_path", "download_task_data", "encode_pair",
           "hellaswag_sums", "in_chunks", "lambada_sums", "read_hellaswag", "read_lambada",
           "read_wikitext", "rolling_windows", "score", "sha256_of", "summarize", "task_file",
           "training_tasks", "wikitext_detokenize", "wikitext_pages", "wikitext_sums"]


def summarize(task: str, sums: dict) -> dict:
    """A task's metrics from its sums (which add up over shares of the rows: ranks)."""
    return TASKS[task].summarize(sums)


def score(task: str, model, encoder, rows: list[dict], **options) -> dict:
    """``summarize(task, sums of the task's rows)``: e.g. ``score("lambada", model, enc, rows)``."""
    return TASKS[task].score(model, encoder, rows, **options)


def training_tasks() -> tuple[str, ...]:
    """The tasks --eval_tasks can score between training steps."""
    return tuple(name for name, t in TASKS.items() if t.in_training)


def data_path(task: str, data_dir: str | os.PathLike = "data") -> Path:
    """Where ``gpt2 download --dataset task`` puts the task's file."""
    return Path(os.path.expanduser(os.fspath(data_dir))) / TASKS[task].data.name


def task_file(task: str, data: str | os.PathLike | None, data_dir: str | os.PathLike = "data",
              flag: str = "--task", give: str = "--data PATH") -> Path:
    """The file a task is scored on: ``data`` as given, else the downloaded one, which must
    be the published file (a download cut short at a record's end would otherwise be scored
    as if it were the benchmark)."""
    if data is not None:
        return Path(data)
    path = data_path(task, data_dir)
    if not path.is_file():
        raise UserError(f"{flag} {task}: no {path}; run `gpt2 download --dataset {task}` or "
                        f"give {give}")
    published = TASKS[task].data
    if path.stat().st_size != published.size or sha256_of(path) != published.sha256:
        raise UserError(f"{path}: not the published {task} file (its size or sha256 differs); "
                        f"run `gpt2 download --dataset {task}` again, or give a file of your "
                        f"own with {give}")
    return path


def download_task_data(task: str, data_dir: str | os.PathLike = "data",
                       base_url: str | None = None, retries: int = 5) -> Path:
    """Fetch a task's published file into ``data_dir`` (``base_url``: a mirror holding the
    same file name), resumable, its sha256 checked; returns its path."""
    if task not in TASKS:
        raise UserError(f"--dataset {task!r}: choose one of {', '.join(TASKS)}")
    published = TASKS[task].data
    url = published.url if base_url is None else f"{base_url.rstrip('/')}/{published.name}"
    return download_checked(url, data_path(task, data_dir), published.size, published.sha256,
                            retries)
