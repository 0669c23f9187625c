"""Where a model directory is, and which of the three layouts it holds (no torch needed).

    resolve_model_dir("124M", "models")              # models/124M (or models/117M: the same model)
    resolve_model_dir(model_dir="checkpoint/run1")   # a run directory: its newest checkpoint
    find_model_dir("checkpoint/run1")                # a command's MODEL_DIR: a path or a name
    detect_format(path)                              # "ours" | "huggingface" | "release"

A training run's directory (``checkpoint/<run>/``) is read as a model directory everywhere: it
names its newest complete checkpoint in ``counter``, and readers follow that to ``model-<N>/``
(the one commit point of a save, so a reader always sees one consistent step).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

WEIGHTS = "model.safetensors"
HPARAMS = "hparams.json"
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
COUNTER = "counter"                 # a run directory's pointer to its newest checkpoint
STATE_FILE = "trainer_state.json"   # what makes a model directory a training checkpoint
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
MODELS = ("124M", "355M", "774M", "1558M")  # the released models
# The first release named the models by miscounted parameters; nshepperd's fork still uses them.
ALIASES = {"117M": "124M", "345M": "355M"}


def resolve_alias(model: str) -> str:
    """117M -> 124M, 345M -> 355M; any other name unchanged."""
    return ALIASES.get(model, model)


def expand(path: str | os.PathLike) -> Path:
    """``~`` and ``$VARS`` expanded, as the original scripts did for --models_dir."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def checkpoint_of_run(run_dir: Path) -> Path | None:
    """The checkpoint a run directory's ``counter`` names, if it is complete; else None."""
    counter = run_dir / COUNTER
    try:
        text = counter.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        step = int(text.strip())
    except ValueError:
        raise UserError(f"{counter}: expected a step number, got {text[:40]!r}") from None
    ckpt = run_dir / f"model-{step}"
    return ckpt if (ckpt / STATE_FILE).is_file() else None


def follow_run_dir(path: Path) -> Path:
    """``path`` itself, or the newest checkpoint when ``path`` is a training run's directory."""
    return checkpoint_of_run(path) or path


def resolve_model_dir(model_name: str = "124M", models_dir: str | os.PathLike = "models",
                      model_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding a model, as every command finds it: ``model_dir`` if given (a
    path; a released model's name such as ``124M`` that is not a path is looked up under
    ``models_dir``), else ``models_dir/model_name``.

    117M and 124M (and 345M and 355M) name the same model: either directory is accepted. A
    run directory resolves to its newest checkpoint.
    """
    if model_dir is not None:
        path = expand(model_dir)
        if path.is_dir():
            return follow_run_dir(path)
        name = str(model_dir)
        if os.sep in name or resolve_alias(name) not in MODELS:
            raise UserError(f"model directory {path} does not exist")
        model_name = name
    root = expand(models_dir)
    names = [model_name, resolve_alias(model_name)]
    names += [old for old, new in ALIASES.items() if new == model_name]
    for name in dict.fromkeys(names):
        if (root / name).is_dir():
            return follow_run_dir(root / name)
    hint = ""
    if resolve_alias(model_name) in MODELS:
        hint = f"; download it with: python download_model.py {model_name} --models_dir {root}"
    raise UserError(f"model directory {root / model_name} does not exist{hint}")


def find_model_dir(text: str | os.PathLike, models_dir: str | os.PathLike = "models") -> Path:
    """A command's MODEL_DIR: a path, a run directory, or a released name under models/."""
    return resolve_model_dir(models_dir=models_dir, model_dir=text)


def has_weights(model_dir: Path) -> bool:
    names = (WEIGHTS, HF_INDEX, "checkpoint")
    return any((model_dir / n).exists() for n in names) or any(model_dir.glob("*.index"))


def detect_format(model_dir: Path) -> str:
    """'ours', 'huggingface' or 'release', from the files present."""
    if (model_dir / HPARAMS).is_file() and (model_dir / WEIGHTS).is_file():
        return "ours"
    if (model_dir / HF_CONFIG).is_file() and ((model_dir / WEIGHTS).is_file()
                                              or (model_dir / HF_INDEX).is_file()):
        return "huggingface"
    if (model_dir / "checkpoint").is_file() or any(model_dir.glob("*.index")):
        return "release"
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{model_dir / pickles[0]}: refusing to load a pickled file (it can run "
                        "arbitrary code); convert it to model.safetensors first")
    raise UserError(f"{model_dir}: no model weights found (expected model.safetensors, or a "
                    "TensorFlow checkpoint as download_model.py fetches)")
