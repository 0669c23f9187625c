"""A training run on disk: checkpoints, keep-last-k, metrics.jsonl, TensorBoard, samples.

    checkpoint/<run>/                 the newest checkpoint (a model directory itself):
        hparams.json  encoder files  model.safetensors   weights, loadable by gpt2.load_model
        optimizer.safetensors         optimizer state as named tensors (never pickled)
        trainer_state.json            step, tokens, RNG states, sampler position, config
        counter                       "<step>\\n": the number of completed updates
        metrics.jsonl                 one JSON object per step
        model-<N>/                    the newest K checkpoints, each complete on its own
    samples/<run>/samples-<N>         the training samples of step N

Each ``model-<N>`` directory is written under a temporary name and renamed into place, so a
crash or a second Ctrl-C never leaves a half-written checkpoint; the top-level files are then
hard links to the newest one (no second copy of the weights on disk).

    run = RunDir("checkpoint", "samples", "run1")
    run.save(step, model, optimizer_tensors, optimizer_meta, state, encoder_dir, keep=5)
    ckpt = run.latest()                 # -> Path of the newest complete checkpoint, or None
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..io.atomic import write_text
from ..io.model_dir import save_model
from ..io.paths import COUNTER, HPARAMS, expand, follow_run_dir, has_weights, resolve_model_dir
from .state import is_checkpoint, write_optimizer, write_state

METRICS_FILE = "metrics.jsonl"
_CKPT_RE = re.compile(r"^model-(\d+)$")


@dataclass
class Source:
    """Where the weights come from and whether the trainer state comes with them."""

    model_dir: Path        # hparams.json + encoder files (+ weights unless fresh_init)
    resume: bool           # a trainer checkpoint: restore optimizer, step, RNGs
    fresh_init: bool       # random initialisation from hparams.json


def _restore_arg_dir(value: str) -> Path:
    """--restore_from PATH: a directory, or a file inside one (model.safetensors, model.ckpt)."""
    path = expand(value)
    if path.is_dir():
        return follow_run_dir(path)
    if path.is_file() or (path.parent.is_dir() and any(path.parent.glob(path.name + ".*"))):
        return path.parent
    raise UserError(f"--restore_from {value}: no such checkpoint directory or file "
                    "(use latest, fresh, or a path)")


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # filesystems without hard links
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


class RunDir:
    """``<checkpoint_dir>/<run_name>`` and ``<samples_dir>/<run_name>``."""

    def __init__(self, checkpoint_dir: str | os.PathLike, samples_dir: str | os.PathLike,
                 run_name: str):
        self.path = Path(checkpoint_dir) / run_name
        self.samples = Path(samples_dir) / run_name

    # -- finding checkpoints

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete ``model-<N>`` directories of the run, oldest first."""
        if not self.path.is_dir():
            return []
        found = []
        for p in self.path.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_dir() and is_checkpoint(p):
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        """The run's newest checkpoint: the one ``counter`` names, else the highest ``model-N``."""
        named = follow_run_dir(self.path) if self.path.is_dir() else self.path
        if named != self.path:
            return named
        ckpts = self.checkpoints()
        if ckpts:
            return ckpts[-1][1]
        return self.path if is_checkpoint(self.path) else None

    def source(self, restore_from: str, overwrite: bool, init: str, model_name: str,
               models_dir: str, model_dir: str | None) -> Source:
        """What ``--restore_from`` (and the model flags) say to start from."""
        def base() -> Source:
            found = resolve_model_dir(model_name, models_dir, model_dir)
            if init == "pretrained" and not has_weights(found) and (found / HPARAMS).is_file():
                raise UserError(f"{found} holds hparams.json but no weights; add --init fresh "
                                "to train a new model from it")
            return Source(found, resume=False, fresh_init=init == "fresh")

        if restore_from == "latest":
            ckpt = self.latest()
            return Source(ckpt, True, False) if ckpt is not None else base()
        if restore_from == "fresh":
            if self.checkpoints() and not overwrite:
                raise UserError(f"{self.path} already holds checkpoints; --restore_from fresh "
                                "would replace them: add --overwrite, or pick another --run_name")
            return base()
        path = _restore_arg_dir(restore_from)
        return Source(path, resume=is_checkpoint(path), fresh_init=False)

    # -- saving

    def _clean_stale(self) -> None:
        for p in self.path.glob(".tmp-model-*"):
            shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, model: torch.nn.Module, optimizer_tensors: dict, optimizer_meta: dict,
             state: dict, encoder_dir: Path | None, keep: int = 5, remove_others: bool = False,
             extra: Callable[[Path], None] | None = None) -> Path:
        """Write ``model-<step>`` atomically, point the run's top level at it, keep ``keep``.

        ``model`` must be the unwrapped module (not compiled, not DDP): its state dict names are
        the ones gpt2.load_model expects. ``remove_others`` drops every older checkpoint of the
        run (a fresh start with --overwrite). ``extra(tmp_dir)`` may add files (e.g. a LoRA
        adapter) before the checkpoint is renamed into place.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        self._clean_stale()
        tmp = self.path / f".tmp-model-{step}-{os.getpid()}"
        save_model(model, tmp, encoder_dir=encoder_dir)
        write_optimizer(tmp, optimizer_tensors, optimizer_meta)
        write_state(tmp, state)
        if extra is not None:
            extra(tmp)

        final = self.path / f"model-{step}"
        old = None
        if final.exists():  # a rewound run saving the same step again
            old = self.path / f".tmp-model-old-{step}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

        # The run directory is itself a model directory holding the newest checkpoint; the
        # counter is written last, so it never names a checkpoint that is not complete.
        for f in sorted(final.iterdir()):
            if f.is_file():
                _link_or_copy(f, self.path / f.name)
            elif f.is_dir():  # e.g. adapter/: small, so a plain copy
                shutil.rmtree(self.path / f.name, ignore_errors=True)
                shutil.copytree(f, self.path / f.name)
        write_text(self.path / COUNTER, f"{step}\n")
        self._prune(final, keep, remove_others)
        return final

    def _prune(self, newest: Path, keep: int, remove_others: bool) -> None:
        older = [p for _, p in self.checkpoints() if p != newest]
        doomed = older if remove_others else older[:max(0, len(older) - (keep - 1))]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    # -- metrics and samples

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines after ``step``: a resumed run rewrites them instead of duplicating."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut short by a crash
        write_text(path, "".join(line + "\n" for line in kept))

    def append_metrics(self, record: dict) -> None:
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_samples(self, step: int, texts: list[str], encoding: str) -> list[str]:
        """``samples/<run>/samples-<step>``: each text after a ``======== SAMPLE i`` banner."""
        formatted = [f"======== SAMPLE {i + 1} ========\n{text}\n" for i, text in enumerate(texts)]
        self.samples.mkdir(parents=True, exist_ok=True)
        write_text(self.samples / f"samples-{step}", "\n".join(formatted), encoding=encoding,
                   errors="replace")
        return formatted
