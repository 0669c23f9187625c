"""What the model-directory layouts share: reading JSON and safetensors, hparams -> GPTConfig,
and the plain weights of a (compiled, DDP- or FSDP-wrapped) model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..model import GPT, GPTConfig, param_shapes


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


def check_shapes(config: GPTConfig, shapes: dict[str, tuple[int, ...]], where) -> None:
    """The weight file's own tensor shapes (read from its header or index, nothing loaded)
    against what the hparams imply: a hostile or mismatched hparams.json is refused in one
    line before anything is allocated."""
    layers = {int(n.split(".")[1]) for n in shapes if n.startswith("h.") and n.count(".") > 1
              and n.split(".")[1].isdigit()}
    if layers and len(layers) != config.n_layer:
        raise UserError(f"{where}: the weights hold {len(layers)} layers but the hparams say "
                        f"n_layer {config.n_layer}")
    expected = param_shapes(config)
    unused = sorted(set(shapes) - set(expected) - {"lm_head.weight"})
    if unused:
        raise UserError(f"{where}: unexpected tensor {unused[0]!r} ({len(unused)} unused in all); "
                        "is this a GPT-2 checkpoint?")
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise UserError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise UserError(f"{where}: {name} has shape {list(shapes[name])}, but the hparams "
                            f"imply {list(shape)}")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read safetensors ({e}); the file may be truncated") from None
