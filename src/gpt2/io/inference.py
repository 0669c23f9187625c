"""Loading a model to run it: the one way every command, the server and the harness backend
do it.

    loaded = load_for_inference("checkpoint/run1", device="cpu", dtype="int8")
    model, encoder, device, model_dir = loaded

The model directory is found as every command finds one (:func:`gpt2.files.paths.
find_model_dir`: a path, a run directory's newest checkpoint, or a released name under
``models/``); its weights are checked against its hparams and its tokenizer against its
vocabulary before anything is loaded; the weights get the dtype asked for (``fp32``, ``bf16``,
``fp16`` or ``int8``: :data:`gpt2.runtime.WEIGHT_DTYPES`) and the model is in eval mode on the
device (default: the accelerator if there is one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import UserError
from ..files.paths import find_model_dir
from ..model import GPT
from ..runtime import DTYPES, WEIGHT_DTYPES, pick_device
from ..tokenizer.files import load_encoder
from .model_dir import check_model_dir, load_model


class Loaded(NamedTuple):
    model: GPT
    encoder: object       # gpt2.tokenizer's Encoder or SentencePieceEncoder
    device: torch.device
    model_dir: Path


def with_dtype(model: torch.nn.Module, dtype: str | None) -> torch.nn.Module:
    """``model`` with weights of ``dtype`` (a name of :data:`WEIGHT_DTYPES`; None: as is)."""
    if dtype in (None, "fp32"):
        return model
    if dtype not in WEIGHT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(WEIGHT_DTYPES)}")
    if dtype == "int8":
        from ..quant import quantize_int8

        return quantize_int8(model.float())
    return model.to(dtype=DTYPES[dtype])


def load_for_inference(path: str | os.PathLike, device: str | torch.device | None = None,
                       dtype: str | None = None) -> Loaded:
    """(model, encoder, device, model directory), checked to fit each other (see the module
    docstring)."""
    model_dir = find_model_dir(path)
    device = device if isinstance(device, torch.device) else pick_device(device)
    encoder = load_encoder(model_dir)
    n_vocab = check_model_dir(model_dir).n_vocab  # checked before anything is loaded
    if encoder.n_vocab > n_vocab:
        raise UserError(f"{model_dir}: the tokenizer has {encoder.n_vocab} ids but the model "
                        f"only {n_vocab}; they do not belong together")
    if encoder.eot_token is not None and not 0 <= encoder.eot_token < n_vocab:
        raise UserError(f"{model_dir}: the encoder's <|endoftext|> id {encoder.eot_token} is "
                        f"outside the model's vocabulary of {n_vocab}")
    model = with_dtype(load_model(model_dir, device=device), dtype).eval()
    return Loaded(model, encoder, device, model_dir)
