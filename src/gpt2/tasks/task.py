"""What a benchmark is, in one row: how its file is read, scored and summed, which metrics it
reports, where `gpt2 download --dataset` gets the file, and what training evals need.

    task = TASKS["lambada"]                      # gpt2.tasks.TASKS
    rows = task.read(path, limit)                # checked records
    result = task.score(model, encoder, rows)    # {"task", sums..., metrics...}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class DataFile:
    """A task's published file: its canonical URL, name, size in bytes and sha256 (as Hugging
    Face datasets' and lm-evaluation-harness's loaders pin them)."""

    url: str
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Task:
    """One benchmark. ``sums(model, encoder, rows, batch_size=, progress=, stop=, **options)``
    returns counts that add up over shares of the rows (ranks); ``metrics(sums)`` turns them
    into the reported numbers, ``shown`` names those a table (and training's log) shows."""

    name: str
    read: Callable[..., list[dict]]        # (path, limit=None) -> rows, each checked
    sums: Callable[..., dict]
    metrics: Callable[[dict], dict]
    shown: tuple[str, ...]
    data: DataFile
    about: str = ""                        # --task's help: scored as which reference does
    rows_per_example: int = 1              # model rows one example takes (HellaSwag: 4)
    in_training: bool = False              # --eval_tasks can score it between steps
    options: tuple[str, ...] = field(default=())   # scoring options it takes (e.g. stride)

    def summarize(self, sums: dict) -> dict:
        """The task's result: its sums and the metrics computed from them."""
        return {"task": self.name, **sums, **self.metrics(sums)}

    def score(self, model, encoder, rows: list[dict], **options) -> dict:
        return self.summarize(self.sums(model, encoder, rows, **options))
