"""What the model-directory layouts share: reading JSON and safetensors, hparams -> GPTConfig,
and the plain weights of a (compiled, DDP- or FSDP-wrapped) model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..model import GPT, GPTConfig


def read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None


def config_from(path: Path, values) -> GPTConfig:
    try:
        return GPTConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read safetensors ({e}); the file may be truncated") from None


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT inside torch.compile / DDP / FSDP wrappers."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"cannot find a GPT inside {type(model).__name__}")
        model = inner
    return model


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's tensors on the CPU, the tied head stored once (as wte)."""
    model = unwrap(model)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
            if k != "lm_head.weight"}
