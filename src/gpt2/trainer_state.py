"""A training run on disk: atomic checkpoints that are model directories, plus the trainer state.

    checkpoint/<run>/                 the newest checkpoint (a model directory itself):
        hparams.json  encoder files  model.safetensors   weights, loadable by gpt2.load_model
        optimizer.safetensors         optimizer state as named tensors (never pickled)
        trainer_state.json            step, tokens, RNG states, sampler position, config
        counter                       "<step>\\n": the number of completed updates
        metrics.jsonl                 one JSON object per step
        model-<N>/                    the newest K checkpoints, each complete on its own

Each ``model-<N>`` directory is written under a temporary name and renamed into place, so a
crash or a second Ctrl-C never leaves a half-written checkpoint; the top-level files are then
hard links to the newest one (no second copy of the weights on disk).

    save_checkpoint(run_dir, step, model, optimizer_tensors, optimizer_meta, state, encoder_dir,
                    keep=5)
    ckpt = find_latest(run_dir)        # -> Path of the newest complete checkpoint, or None
    state = read_state(ckpt); tensors, meta = read_optimizer(ckpt)
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
COUNTER_FILE = "counter"
METRICS_FILE = "metrics.jsonl"
_CKPT_RE = re.compile(r"^model-(\d+)$")


def write_text_atomic(path: Path, text: str, encoding: str = "utf-8", errors: str = "strict"
                      ) -> None:
    """Write via a temporary file in the same directory and rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding=encoding, errors=errors) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- RNG states as JSON ------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    """Every global RNG a training step may touch (dropout draws from torch's)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_unb64(s) for s in saved])


# --- finding checkpoints -----------------------------------------------------------------------

def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``model-<N>`` directories of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_checkpoint(path: Path) -> bool:
    """A directory written by the trainer (weights plus trainer state)."""
    return (Path(path) / STATE_FILE).is_file()


def find_latest(run_dir: Path) -> Path | None:
    """The run's newest checkpoint: the one ``counter`` names, else the highest ``model-N``."""
    run_dir = Path(run_dir)
    counter = run_dir / COUNTER_FILE
    if counter.is_file():
        try:
            step = int(counter.read_text().strip())
        except ValueError:
            raise UserError(f"{counter}: expected a step number, got {counter.read_text()[:40]!r}")
        if is_checkpoint(run_dir / f"model-{step}"):
            return run_dir / f"model-{step}"
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        return ckpts[-1][1]
    return run_dir if is_checkpoint(run_dir) else None


def read_state(ckpt: Path) -> dict:
    path = Path(ckpt) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable trainer state ({e}); restore from another "
                        "checkpoint with --restore_from") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{path}: not a trainer state (no integer 'step')")
    return state


def read_optimizer(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The saved optimizer tensors and metadata, or None if the checkpoint has none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(ckpt) / OPTIMIZER_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("optimizer", "{}"))
        tensors = load_file(str(path), device="cpu")
    except (OSError, SafetensorError, json.JSONDecodeError, ValueError) as e:
        raise UserError(f"{path}: unreadable optimizer state ({e})") from None
    return tensors, meta


# --- saving ------------------------------------------------------------------------------------

def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # filesystems without hard links
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _clean_stale(run_dir: Path) -> None:
    for p in run_dir.glob(".tmp-model-*"):
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer_tensors: dict[str, torch.Tensor], optimizer_meta: dict,
                    state: dict, encoder_dir: Path | None, keep: int = 5,
                    remove_others: bool = False, extra=None) -> Path:
    """Write ``run_dir/model-<step>`` atomically, point the run's top level at it, keep ``keep``.

    ``model`` must be the unwrapped module (not compiled, not DDP): its state dict names are the
    ones gpt2.load_model expects. ``remove_others`` drops every older checkpoint of the run (a
    fresh start with --overwrite). ``extra(tmp_dir)`` may add files (e.g. a LoRA adapter) before
    the checkpoint is renamed into place.
    """
    from safetensors.torch import save_file

    from .checkpoint import save_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(run_dir)
    tmp = run_dir / f".tmp-model-{step}-{os.getpid()}"
    save_model(model, tmp, encoder_dir=encoder_dir)
    save_file(optimizer_tensors, str(tmp / OPTIMIZER_FILE),
              metadata={"optimizer": json.dumps(optimizer_meta)})
    write_text_atomic(tmp / STATE_FILE, json.dumps(state, default=str))  # Paths in the config
    if extra is not None:
        extra(tmp)

    final = run_dir / f"model-{step}"
    old = None
    if final.exists():  # a rewound run saving the same step again
        old = run_dir / f".tmp-model-old-{step}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

    # The run directory is itself a model directory holding the newest checkpoint; the counter
    # is written last, so it never names a checkpoint that is not complete.
    for f in sorted(final.iterdir()):
        if f.is_file():
            _link_or_copy(f, run_dir / f.name)
        elif f.is_dir():  # e.g. adapter/: small, so a plain copy
            shutil.rmtree(run_dir / f.name, ignore_errors=True)
            shutil.copytree(f, run_dir / f.name)
    write_text_atomic(run_dir / COUNTER_FILE, f"{step}\n")

    for n, path in list_checkpoints(run_dir):
        if path == final:
            continue
        if remove_others:
            shutil.rmtree(path, ignore_errors=True)
    ckpts = [p for _, p in list_checkpoints(run_dir) if p != final]
    for path in ckpts[:max(0, len(ckpts) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines after ``step``: a resumed run rewrites them instead of duplicating."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by a crash
    write_text_atomic(path, "".join(line + "\n" for line in kept))
