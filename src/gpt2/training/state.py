"""What a training checkpoint holds besides the weights: trainer state and optimizer state.

    trainer_state.json      step, tokens, RNG states, sampler position, config (JSON)
    optimizer.safetensors   optimizer state as named tensors (never pickled)

    write_state(ckpt, state); state = read_state(ckpt)
    write_optimizer(ckpt, tensors, meta); tensors, meta = read_optimizer(ckpt)
    set_rng_state(rng_state())          # every global RNG a training step may touch
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from ..files.atomic import atomic_write, write_text
from ..files.paths import STATE_FILE
from ..runtime import BACKENDS, device_rng_state, set_device_rng_state

OPTIMIZER_FILE = "optimizer.safetensors"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    """Every global RNG a training step may touch (dropout draws from torch's), as JSON."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    for kind, states in device_rng_state().items():  # "cuda": [...], one per device
        state[kind] = [_b64(s) for s in states]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    set_device_rng_state({kind: [_unb64(s) for s in state[kind]]
                          for kind in BACKENDS if kind != "cpu" and kind in state})


def seed_globals(seed: int) -> None:
    """Same seed, same run: dropout and anything else drawing from the global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def restore_rngs(state: dict, rank: int, world: int, noise_rng: np.random.Generator,
                 log: Callable[[str], None]) -> None:
    """Each rank's own RNGs when the run resumes on as many ranks as it was saved from;
    otherwise rank 0's, and the other ranks keep the streams they were seeded with."""
    ranks = state.get("ranks") or [{k: state[k] for k in ("noise_rng", "rng") if k in state}]
    if len(ranks) != world:
        log(f"note: the checkpoint was saved by {len(ranks)} process(es), this run has {world}: "
            "weights, optimizer, step and data position resume, per-rank random streams restart")
    own = ranks[rank] if len(ranks) == world else (ranks[0] if rank == 0 else {})
    if "noise_rng" in own:
        noise_rng.bit_generator.state = own["noise_rng"]
    if "rng" in own:
        set_rng_state(own["rng"])


def is_checkpoint(path: Path) -> bool:
    """A directory written by the trainer (weights plus trainer state)."""
    return (Path(path) / STATE_FILE).is_file()


def write_state(ckpt: Path, state: dict) -> None:
    write_text(Path(ckpt) / STATE_FILE, json.dumps(state, default=str))  # Paths in the config


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


def write_optimizer(ckpt: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    atomic_write(Path(ckpt) / OPTIMIZER_FILE, lambda p: save_file(
        tensors, str(p), metadata={"optimizer": json.dumps(meta)}))


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
