"""Model directories: load any of the three layouts a user may have, save ours.

A model directory is one of:

- **release**: OpenAI's layout, as ``download_model.py`` fetches it: ``checkpoint``,
  ``model.ckpt.{index,data-00000-of-00001,meta}``, ``hparams.json``, ``encoder.json``,
  ``vocab.bpe``. The TensorFlow checkpoint is read without TensorFlow (:mod:`gpt2.io.release`).
- **huggingface**: ``config.json`` + ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``) + ``vocab.json`` + ``merges.txt`` (:mod:`gpt2.io.hf`).
- **ours**: ``hparams.json`` + ``model.safetensors`` + the encoder files; what :func:`save_model`
  and training checkpoints write, so a checkpoint directory is itself a model directory.

Foreign names are mapped by one table per format; every source tensor must be used and every
parameter filled with the right shape, or loading stops with a one-line error. Pickled weights
(``.bin``, ``.pt``, ``.ckpt`` from PyTorch) are refused: unpickling a downloaded file runs code.

    model = load_model("models/124M")                 # eval mode, fp32 on CPU
    save_model(model, "out/my-model", encoder_dir="models/124M")
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserError
from ..model import GPT, GPTConfig
from ..runtime import parse_dtype
from ..tokenizer.files import copy_encoder_files
from ..files.atomic import atomic_write, write_text
from .hf import hf_config, hf_shapes, hf_tensors
from ..files.paths import (HF_CONFIG, HPARAMS, WEIGHTS, detect_format, expand, find_model_dir,
                    follow_run_dir)
from .tensors import (check_shapes, config_from, load_safetensors, read_json, safetensors_shapes,
                      unwrap, weights_of)
from .release import release_shapes, release_tensors


def load_config(model_dir: str | os.PathLike) -> GPTConfig:
    """The model's GPTConfig, from hparams.json (ours, release) or config.json (Hugging Face);
    a training run's directory reads the checkpoint its ``counter`` names."""
    model_dir = follow_run_dir(Path(model_dir))
    if (model_dir / HPARAMS).is_file():
        return config_from(model_dir / HPARAMS, read_json(model_dir / HPARAMS))
    if (model_dir / HF_CONFIG).is_file():
        return hf_config(model_dir / HF_CONFIG)
    raise UserError(f"{model_dir / HPARAMS}: file not found")


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
_skip = threading.local()  # this thread is building a model to be filled from a file
_lock = threading.Lock()


def _skipping(original):
    @functools.wraps(original)
    def init(tensor, *args, **kwargs):
        if getattr(_skip, "depth", 0):
            return tensor
        return original(tensor, *args, **kwargs)
    init._gpt2_skipping = True
    return init


@contextlib.contextmanager
def _uninitialized() -> Iterator[None]:
    """torch.nn.init's functions do nothing in this thread inside the block (as transformers'
    no_init_weights; other threads keep initialising): a model built on the meta device to be
    filled from a file needs no initial values, and computing them there runs torch's Python
    meta kernels, whose first use imports torch._dynamo (over a second of every command's
    start). The wrappers are installed once and stay (outside a block they call through), so
    no thread ever puts back a function another replaced meanwhile."""
    with _lock:
        for name in _INITS:
            original = getattr(torch.nn.init, name)
            if not getattr(original, "_gpt2_skipping", False):
                setattr(torch.nn.init, name, _skipping(original))
    _skip.depth = getattr(_skip, "depth", 0) + 1
    try:
        yield
    finally:
        _skip.depth -= 1


def meta_model(config: GPTConfig) -> GPT:
    """A GPT on the meta device (no memory, no initial values), for weights to be assigned."""
    with torch.device("meta"), _uninitialized():
        return GPT(config)


def model_from_tensors(config: GPTConfig, tensors: dict[str, torch.Tensor],
                       where: Path) -> GPT:
    """Make a GPT from named tensors: every tensor used, every parameter filled, shapes checked."""
    if "lm_head.weight" in tensors:  # readers drop a tied head; one left here is not tied
        raise UserError(f"{where}: unexpected tensor 'lm_head.weight'; GPT-2 ties it to wte")
    check_shapes(config, {k: tuple(v.shape) for k, v in tensors.items()}, where)
    model = meta_model(config)
    expected = [k for k in model.state_dict() if k != "lm_head.weight"]
    state = {k: tensors[k] for k in expected}
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.lm_head.weight = model.wte.weight  # assign=True replaced wte's parameter: tie again
    return model


def weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """The shapes the weight files hold, under our names, from headers and indexes alone."""
    fmt = detect_format(model_dir)
    if fmt == "ours":
        return safetensors_shapes(model_dir / WEIGHTS)
    return hf_shapes(model_dir) if fmt == "huggingface" else release_shapes(model_dir)


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a model directory under our names, whatever its layout."""
    fmt = detect_format(model_dir)
    if fmt == "ours":
        return load_safetensors(model_dir / WEIGHTS)
    if fmt == "huggingface":
        return hf_tensors(model_dir)
    return release_tensors(model_dir)


def check_model_dir(path: str | os.PathLike) -> GPTConfig:
    """The config of a model directory whose weight files agree with it (nothing loaded)."""
    model_dir = find_model_dir(path)
    config = load_config(model_dir)
    check_shapes(config, weight_shapes(model_dir), model_dir)
    return config


def load_model(path: str | os.PathLike, device=None, dtype=None) -> GPT:
    """Load a model directory of any layout; returns the model in eval mode.

    ``path`` may also be a released model's name (``"124M"``), looked up under ``models/``, or
    a training run's directory (its newest checkpoint). Weights keep float32 unless ``dtype``
    (``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype) says otherwise; ``device`` defaults
    to the CPU.
    """
    model_dir = find_model_dir(path)
    dtype = parse_dtype(dtype) or torch.float32
    config = load_config(model_dir)
    check_shapes(config, weight_shapes(model_dir), model_dir)  # before allocating anything
    model = model_from_tensors(config, read_tensors(model_dir), model_dir)
    model.to(device=device or "cpu", dtype=dtype)
    return model.eval()


def write_hparams(config: GPTConfig, model_dir: Path) -> None:
    write_text(model_dir / HPARAMS, json.dumps(config.to_dict(), indent=2) + "\n")


def save_model(model: torch.nn.Module, path: str | os.PathLike,
               encoder_dir: str | os.PathLike | None = None) -> Path:
    """Write ``path`` as our model directory: model.safetensors, hparams.json, encoder files.

    Each file is written to a temporary name and renamed, so an existing model directory is
    never left half-overwritten. Weights keep the model's dtype and come from the unwrapped
    module (no ``_orig_mod.`` or ``module.`` prefixes); the tied head is stored once, as wte.
    """
    from safetensors.torch import save_file

    out = expand(path)
    out.mkdir(parents=True, exist_ok=True)
    state = weights_of(model)
    atomic_write(out / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_hparams(unwrap(model).config, out)
    if encoder_dir is not None and Path(encoder_dir).resolve() != out.resolve():
        copy_encoder_files(encoder_dir, out)
    return out
