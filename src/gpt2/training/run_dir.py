"""A training run on disk: checkpoints, keep-last-k, metrics.jsonl, TensorBoard, samples.

    checkpoint/<run>/                 a model directory by way of ``counter``:
        counter                       "<step>\\n": the newest complete checkpoint (the commit point)
        model-<N>/                    the newest K checkpoints, each complete on its own:
            hparams.json  encoder files  model.safetensors   weights (gpt2.load_model)
            optimizer.safetensors     optimizer state as named tensors (never pickled)
            trainer_state.json        step, tokens, RNG states, sampler position, config
        metrics.jsonl                 one JSON object per step
        lock                          who is training in this directory (RunLock)
    samples/<run>/samples-<N>         the training samples of step N

Each ``model-<N>`` is written and fsynced under a temporary name, renamed into place, and only
then named by ``counter``; every reader (``--restore_from latest``, ``gpt2.load_model``, the
sample scripts, evaluate, export) follows ``counter``, so a kill at any moment leaves one
consistent step to read.

    run = RunDir("checkpoint", "samples", "run1")
    run.save(step, model, optimizer_tensors, optimizer_meta, state, encoder_dir, keep=5)
    ckpt = run.latest()                 # -> Path of the newest complete checkpoint, or None
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..files.atomic import (file_mode, fsync_dir, no_space_message, pid_alive, write_error,
                         remove_stale_temp_files, write_text)
from ..io.model_dir import save_model
from ..files.paths import COUNTER, HPARAMS, expand, follow_run_dir, has_weights, resolve_model_dir
from .state import is_checkpoint, write_optimizer, write_state

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "lock"
_CKPT_RE = re.compile(r"^model-(\d+)$")
# Temporary directories of saves: ".tmp-model-<step>-<pid>" and ".tmp-model-old-<pid>-model-<N>".
_TMP_DIR_RE = re.compile(r"^\.tmp-model-(?:\d+-(?P<new>\d+)|old-(?P<old>\d+)-model-\d+)$")
# What a checkpoint holds; earlier versions also kept copies of these at the run's top level.
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "trainer_state.json",
                    "hparams.json", "encoder.json", "vocab.bpe", "vocab.json", "merges.txt",
                    "sp.model", "chat_template.jinja")


@dataclass
class StartPoint:
    """Where the weights come from and whether the trainer state comes with them."""

    model_dir: Path        # hparams.json + encoder files (+ weights unless fresh_init)
    resume: bool           # a trainer checkpoint: restore optimizer, step, RNGs
    fresh_init: bool       # random initialisation from hparams.json


def _restore_arg_dir(value: str) -> Path:
    """--restore_from PATH: a directory, or a file inside one (model.safetensors, model.ckpt)."""
    path = expand(value)
    if path.is_dir():
        return follow_run_dir(path)
    if path.name in CHECKPOINT_FILES and follow_run_dir(path.parent) != path.parent:
        return follow_run_dir(path.parent)  # run/model.safetensors: the run's newest checkpoint
    if path.is_file() or (path.parent.is_dir() and any(path.parent.glob(path.name + ".*"))):
        return path.parent
    raise UserError(f"--restore_from {value}: no such checkpoint directory or file "
                    "(use latest, fresh, or a path)")


def _size(optimizer_tensors: dict, model: torch.nn.Module) -> int:
    """Bytes a checkpoint of this model and optimizer state takes, about."""
    tensors = list(optimizer_tensors.values()) + list(model.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors) + (1 << 20)


class RunLock:
    """``<run>/lock``: one training process per run directory, for as long as it runs.

    An flock held on the file (released by the kernel however the process ends, SIGKILL
    included) says the run is in use; the file says by whom (pid, host, start time). A lock
    file naming a process that is gone is taken over with a warning. The file is emptied,
    never deleted, on release, so that two processes can never lock two different files.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def _holder(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            holder = json.loads(os.read(fd, 4096) or b"{}")
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self, log: Callable[[str], None]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        held = self._try_flock(fd)
        holder = self._holder(fd)
        host, pid = holder.get("host"), holder.get("pid")
        alive_here = host == socket.gethostname() and isinstance(pid, int) and pid_alive(pid)
        if held is False or (held is None and alive_here and pid != os.getpid()):
            os.close(fd)
            raise UserError(f"{self.run_dir} is in use by process {pid} on {host} (started "
                            f"{holder.get('started', '?')}); wait for it to finish, or pick "
                            "another --run_name")
        if pid and pid != os.getpid():
            log(f"warning: {self.run_dir}: taking over the lock left by process {pid} on {host} "
                f"(started {holder.get('started', '?')}), which is gone")
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode() + b"\n", 0)
        os.fsync(fd)
        self.fd = fd

    @staticmethod
    def _try_flock(fd: int) -> bool | None:
        """True: locked; False: another process holds it; None: no flock on this filesystem."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


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

    def start_point(self, restore_from: str, overwrite: bool, init: str, model_name: str,
                    models_dir: str, model_dir: str | None) -> StartPoint:
        """What ``--restore_from`` (and the model flags) say to start from."""
        def base() -> StartPoint:
            found = resolve_model_dir(model_name, models_dir, model_dir)
            if init == "pretrained" and not has_weights(found) and (found / HPARAMS).is_file():
                raise UserError(f"{found} holds hparams.json but no weights; add --init fresh "
                                "to train a new model from it")
            return StartPoint(found, resume=False, fresh_init=init == "fresh")

        if restore_from == "latest":
            ckpt = self.latest()
            return StartPoint(ckpt, True, False) if ckpt is not None else base()
        if restore_from == "fresh":
            if self.checkpoints() and not overwrite:
                raise UserError(f"{self.path} already holds checkpoints; --restore_from fresh "
                                "would replace them: add --overwrite, or pick another --run_name")
            return base()
        path = _restore_arg_dir(restore_from)
        return StartPoint(path, resume=is_checkpoint(path), fresh_init=False)

    # -- saving

    def clean_leftovers(self) -> list[Path]:
        """Remove what crashed saves of this run left: ``.tmp-model-*`` directories and our
        temporary files, of processes that are gone (never a user's file)."""
        removed = []
        if not self.path.is_dir():
            return removed
        for p in self.path.iterdir():
            m = _TMP_DIR_RE.match(p.name)
            if m and p.is_dir() and not pid_alive(int(m.group("new") or m.group("old"))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed + remove_stale_temp_files(self.path)

    def check_space(self, needed: int) -> None:
        """Refuse a save that cannot fit before writing any of it."""
        self.path.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise UserError(no_space_message(self.path, needed))

    def save(self, step: int, model: torch.nn.Module, optimizer_tensors: dict, optimizer_meta: dict,
             state: dict, encoder_dir: Path | None, keep: int = 5, remove_others: bool = False,
             extra: Callable[[Path], None] | None = None) -> Path:
        """Write ``model-<step>`` completely, then publish it: one commit point per save.

        Every file of the checkpoint is written and fsynced under ``.tmp-model-<step>-<pid>``,
        the directory renamed to ``model-<step>``, and only then ``counter`` (the run's pointer
        to its newest checkpoint, which every reader follows) atomically rewritten. A kill at
        any moment leaves the previous checkpoint named by ``counter``; a failed save removes
        what it wrote. ``model`` must be the unwrapped module; ``remove_others`` drops every
        older checkpoint (a fresh start with --overwrite); ``extra(tmp_dir)`` may add files.
        """
        self.check_space(_size(optimizer_tensors, model))
        tmp = self.path / f".tmp-model-{step}-{os.getpid()}"
        try:
            save_model(model, tmp, encoder_dir=encoder_dir)
            write_optimizer(tmp, optimizer_tensors, optimizer_meta)
            write_state(tmp, state)
            if extra is not None:
                extra(tmp)
            fsync_dir(tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = write_error(e, self.path, _size(optimizer_tensors, model))
            if error is not None:
                raise error from None
            raise
        final = self.path / f"model-{step}"
        if final.exists():  # a rewound run saving the same step again: that one is stale
            self._discard(final)
        os.replace(tmp, final)
        fsync_dir(self.path)
        write_text(self.path / COUNTER, f"{step}\n")  # the commit point
        self._drop_top_level_copies()
        self._prune(final, keep, remove_others)
        return final

    def _discard(self, path: Path) -> None:
        """Rename first, then delete: a kill mid-delete leaves a temporary name, not a
        half-deleted checkpoint that looks complete."""
        doomed = self.path / f".tmp-model-old-{os.getpid()}-{path.name}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _drop_top_level_copies(self) -> None:
        """Runs saved by earlier versions kept the newest checkpoint's files (hard links) at the
        top level too; readers follow ``counter`` now, and those copies would go stale."""
        for name in CHECKPOINT_FILES:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        shutil.rmtree(self.path / "adapter", ignore_errors=True)

    def _prune(self, newest: Path, keep: int, remove_others: bool) -> None:
        older = [p for _, p in self.checkpoints() if p != newest]
        doomed = older if remove_others else older[:max(0, len(older) - (keep - 1))]
        for path in doomed:
            self._discard(path)

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

    def append_metrics(self, record: dict, tensorboard=None) -> None:
        """One line of metrics.jsonl (and the same numbers to TensorBoard, when it logs)."""
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if tensorboard is not None:
            tensorboard.write(record)

    def write_samples(self, step: int, texts: list[str], encoding: str) -> list[str]:
        """``samples/<run>/samples-<step>``: each text after a ``======== SAMPLE i`` banner."""
        formatted = [f"======== SAMPLE {i + 1} ========\n{text}\n" for i, text in enumerate(texts)]
        self.samples.mkdir(parents=True, exist_ok=True)
        write_text(self.samples / f"samples-{step}", "\n".join(formatted), encoding=encoding,
                   errors="replace")
        return formatted


def space_warning(model: torch.nn.Module, optimizer: str, run_dir: Path) -> str | None:
    """Said early: the disk will not hold a checkpoint (weights + optimizer state), about."""
    slots = {"adam": 2, "adamw": 2, "sgd": 0, "adafactor": 0.1, "muon": 2}[optimizer]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = int(weights * (1 + slots)) + (1 << 20)
    free = shutil.disk_usage(run_dir).free
    if free >= needed:
        return None
    return (f"warning: {run_dir} has {free / 1e6:.0f} MB free, but a checkpoint of this run "
            f"needs about {needed / 1e6:.0f} MB: saves will fail; free some space or pick "
            "another --checkpoint_dir")
