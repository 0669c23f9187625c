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


def load_for_sampling(model_dir: Path, device_name: str | None):
    """(model, encoder, device) of a model directory, checked to fit each other."""
    device = pick_device(device_name)
    enc = load_encoder(model_dir)
    n_vocab = check_model_dir(model_dir).n_vocab  # checked before anything is loaded
    if enc.n_vocab > n_vocab:
        raise UserError(f"{model_dir}: the tokenizer has {enc.n_vocab} ids but the model only "
                        f"{n_vocab}; they do not belong together")
    if enc.eot_token is not None and not 0 <= enc.eot_token < n_vocab:
        raise UserError(f"{model_dir}: the encoder's <|endoftext|> id {enc.eot_token} is outside "
                        f"the model's vocabulary of {n_vocab}")
    return load_model(model_dir, device=device), enc, device


def generator_for(device: torch.device, seed: int | None) -> torch.Generator:
    """A random stream on ``device``: seeded, or from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator
