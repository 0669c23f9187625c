"""What several commands share: the sampling flags' checks and loading a model to sample from."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..errors import UserError
from ..io.model_dir import check_model_dir, load_model
from ..runtime import pick_device
from ..tokenizer.files import load_encoder


def check_sampling_flags(args: argparse.Namespace) -> None:
    """--temperature, --top_k, --top_p: the checks every sampling command shares."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0 disables it), got {args.top_k}")
    if not 0.0 <= args.top_p <= 1.0:
        raise UserError(f"--top_p must be in [0, 1] (0 and 1 disable it), got {args.top_p}")


WEIGHT_DTYPES = ("fp32", "bf16", "fp16", "int8")


def add_dtype_argument(p: argparse.ArgumentParser, *names: str, dest: str = "dtype") -> None:
    """``--dtype``: the weights' type when sampling or scoring, int8 included."""
    p.add_argument(*(names or ("--dtype",)), dest=dest, choices=WEIGHT_DTYPES, default="fp32",
                   help="the weights' type: fp32, bf16, fp16, or int8 (per-channel int8 "
                        "weights of the blocks and head, PyTorch's int8 kernels; gpt2.quant)")


def with_dtype(model: torch.nn.Module, dtype: str | None) -> torch.nn.Module:
    """``model`` with weights of ``dtype`` (a name of :data:`WEIGHT_DTYPES`; None: as is)."""
    if dtype in (None, "fp32"):
        return model
    if dtype == "int8":
        from ..quant import quantize_int8

        return quantize_int8(model.float())
    from ..runtime import DTYPES

    return model.to(dtype=DTYPES[dtype])


def load_for_sampling(model_dir: Path, device_name: str | None, dtype: str | None = None):
    """(model, encoder, device) of a model directory, checked to fit each other; ``dtype``:
    see :func:`with_dtype`."""
    device = pick_device(device_name)
    enc = load_encoder(model_dir)
    n_vocab = check_model_dir(model_dir).n_vocab  # checked before anything is loaded
    if enc.n_vocab > n_vocab:
        raise UserError(f"{model_dir}: the tokenizer has {enc.n_vocab} ids but the model only "
                        f"{n_vocab}; they do not belong together")
    if enc.eot_token is not None and not 0 <= enc.eot_token < n_vocab:
        raise UserError(f"{model_dir}: the encoder's <|endoftext|> id {enc.eot_token} is outside "
                        f"the model's vocabulary of {n_vocab}")
    return with_dtype(load_model(model_dir, device=device), dtype), enc, device


def generator_for(device: torch.device, seed: int | None) -> torch.Generator:
    """A random stream on ``device``: seeded, or from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator
