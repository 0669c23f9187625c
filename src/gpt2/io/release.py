"""OpenAI's release layout (TensorFlow checkpoint files): read it (one name table), write it.

    tensors = release_tensors(Path("models/124M"))   # our names, conv1d [1, in, out] -> [out, in]
    export_release(model, "out/run1-tf", encoder_dir="checkpoint/run1")

**Writing** produces ``checkpoint``, ``model.ckpt.index``, ``model.ckpt.data-00000-of-00001``,
hparams.json, encoder.json and vocab.bpe, exactly the variables of OpenAI's checkpoints
(``model/h0/attn/c_attn/w`` [1, in, out] ...), in float32, without TensorFlow. The
``model.ckpt.meta`` graph cannot be produced without TensorFlow: code that restores variables by
name (``tf.train.Saver`` over a graph built by model.py, as the original scripts do,
``tf.train.load_checkpoint``) works; code that imports the .meta graph does not. Names come from
inverting the reading table (:func:`release_name`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..tokenizer.files import bpe_files
from ..files.atomic import copy_file, write_json
from .hf import warn_no_tokenizer
from .tensors import unwrap, weights_of
from ..files.tf_checkpoint import list_tf_checkpoint, read_tf_checkpoint, write_tf_checkpoint


def release_target(name: str) -> tuple[str, bool]:
    """Release variable name -> (our name, is a conv1d weight [1, in, out] to squeeze and transpose)."""
    m = re.fullmatch(r"model/(.+)", name)
    if not m:
        return name, False
    parts = m.group(1).split("/")
    if parts[0] in ("wte", "wpe") and len(parts) == 1:
        return f"{parts[0]}.weight", False
    if re.fullmatch(r"h\d+", parts[0]):
        parts[0] = f"h.{parts[0][1:]}"
    leaf = {"g": "weight", "b": "bias", "w": "weight"}.get(parts[-1], parts[-1])
    return ".".join(parts[:-1] + [leaf]), parts[-1] == "w"


def release_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Our names -> shapes, from the checkpoint's index alone (the data file is not read)."""
    out = {}
    for name, (_, shape) in list_tf_checkpoint(model_dir).items():
        target, conv = release_target(name)
        out[target] = (shape[2], shape[1]) if conv and len(shape) == 3 else tuple(shape)
    return out


def release_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, array in read_tf_checkpoint(model_dir).items():
        target, conv = release_target(name)
        if conv:
            if array.ndim != 3 or array.shape[0] != 1:
                raise UserError(f"{model_dir}: {name} has shape {list(array.shape)}, expected [1, in, out]")
            array = array[0].T
        out[target] = torch.from_numpy(np.ascontiguousarray(array))
    return out


# --- writing ---------------------------------------------------------------------------------

def release_name(name: str, ndim: int) -> tuple[str, bool]:
    """Our parameter name -> (release variable name, is a conv1d [1, in, out] weight?).

    Candidates are spelled from our name; release_target decides which ones load back into it,
    and of those the simplest wins (``model/wte``, not ``model/wte/w``), a matrix being a conv1d
    ``w`` and a vector a layer-norm ``g``.
    """
    parts = name.split(".")
    if parts[0] == "h":
        parts = [f"h{parts[1]}"] + parts[2:]
    stem = "model/" + "/".join(parts[:-1])
    candidates = [f"model/{parts[0]}"] + [f"{stem}/{leaf}" for leaf in ("w", "g", "b")]
    found = [(c, conv) for c in candidates for target, conv in [release_target(c)]
             if target == name]
    if len(found) > 1:  # "model/wte" over "model/wte/w"; then "w" for matrices, "g" for vectors
        shortest = min(len(c) for c, _ in found)
        found = [(c, conv) for c, conv in found if len(c) == shortest]
    if len(found) > 1:
        found = [(c, conv) for c, conv in found if conv == (ndim == 2)]
    if len(found) != 1:
        raise ValueError(f"no release variable maps to {name!r}")
    return found[0]


def export_release(model: torch.nn.Module, out_dir: str | os.PathLike,
                   encoder_dir: str | os.PathLike | None = None) -> Path:
    """Write OpenAI's release layout (no .meta); tokenizer files come from ``encoder_dir``."""
    config = unwrap(model).config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in weights_of(model).items():
        array = t.float().numpy()
        tf_name, conv = release_name(name, array.ndim)
        tensors[tf_name] = array.T[None] if conv else array  # [out, in] -> [1, in, out]
    write_tf_checkpoint(out / "model.ckpt", tensors)
    hparams = {k: getattr(config, k) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}
    write_json(out / "hparams.json", hparams)
    files = bpe_files(encoder_dir) if encoder_dir is not None else None
    if files is None:
        warn_no_tokenizer(encoder_dir)
    else:
        copy_file(files[0], out / "encoder.json")
        copy_file(files[1], out / "vocab.bpe")
    return out
