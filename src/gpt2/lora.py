"""LoRA: fine-tune a GPT through small low-rank adapters, then fold them back into the weights.

Each targeted ``nn.Linear`` (``y = W x + b``) becomes ``y = W x + b + (alpha / rank) * B A x``
with ``A`` [rank, in] and ``B`` [out, rank]. ``B`` starts at zero, so the wrapped model computes
exactly what the base model did until training moves it; every other parameter is frozen.

    model = apply_lora(load_model("models/124M"), rank=8, alpha=16, targets=("c_attn",))
    ...train: only the lora_A / lora_B parameters have requires_grad...
    save_lora(model, "checkpoint/run1/adapter", base_model="models/124M")  # a few hundred KB
    model = load_lora(load_model("models/124M"), "checkpoint/run1/adapter")
    model = load_lora_model("checkpoint/run1/adapter")   # the same, base from lora.json
    save_model(merged_model(model), "ckpt")         # a plain copy; model keeps its adapters
    plain = merge_lora(model)                       # in place: a GPT again, adapters folded in

    gpt2 lora merge models/124M checkpoint/run1/adapter out/merged   # the same, from the shell
    (gpt2.commands.lora)

Targets name modules by their last components: ``c_attn`` matches every block's
``attn.c_attn``, ``c_proj`` both ``attn.c_proj`` and ``mlp.c_proj``, ``mlp.c_proj`` only the
latter. The tied ``lm_head`` / ``wte`` are never adapted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from .errors import UserError
from .files.atomic import atomic_write, write_text
from .io.model_dir import load_model, meta_model
from .io.tensors import load_safetensors, unwrap

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "lora.json"
FORMAT = "gpt2-lora"


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a trainable low-rank update; the base layer is kept (frozen)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.enabled = True  # False: the base layer alone (adapters_off)
        kwargs = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kwargs))
        # A random, B zero (as in the LoRA paper): the update B A starts at exactly zero while
        # the gradient w.r.t. B is not, so training can move away from the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    # Code that reads `layer.weight` / `layer.bias` (e.g. weight tying checks) still works.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update to ``base.weight`` ([out, in]) that this adapter amounts to, in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model: every adapter of ``model`` left out until the block ends (a DPO
    reference without a second copy of the weights, as PEFT's ``disable_adapter``)."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def parse_targets(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"c_attn,c_proj"`` -> ``("c_attn", "c_proj")`` (what a ``--lora_targets`` flag holds)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    targets = tuple(t.strip() for t in items if t.strip())
    if not targets:
        raise ValueError("LoRA targets must name at least one layer, e.g. c_attn")
    return targets


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _targeted(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the nn.Linear modules the targets select; every target must select something."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    names = []
    for target in targets:
        found = [n for n in linears if _matches(n, target)]
        if not found:
            choices = sorted({n.split(".", 2)[-1] for n in linears})
            raise ValueError(f"LoRA target {target!r} matches no linear layer; choose from "
                             f"{', '.join(choices)} (or their last part, e.g. c_proj)")
        names += found
    return list(dict.fromkeys(names))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, rank: int, alpha: float,
               targets: tuple[str, ...] | list[str] | str = ("c_attn",)) -> nn.Module:
    """Wrap the targeted linear layers with adapters (in place) and freeze everything else.

    Returns ``model``. The output is unchanged until the adapters are trained (B starts at 0).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; merge_lora it first")
    names = _targeted(model, parse_targets(targets))
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (``h.0.attn.c_attn.lora_A`` ...): what save_lora writes."""
    return {n: p.detach() for n, p in model.named_parameters()
            if n.endswith(".lora_A") or n.endswith(".lora_B")}


def _settings(model: nn.Module) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters (call apply_lora first)")
    first = next(iter(layers.values()))
    return {"rank": first.rank, "alpha": first.alpha, "targets": list(layers)}


def save_lora(model: nn.Module, path: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write ``adapter.safetensors`` (adapters only) and ``lora.json`` into directory ``path``.

    ``lora.json`` records rank, alpha, the adapted layers, the base model's hparams and
    ``base_model`` (a path or name, for people; merging checks the hparams, not the name).
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, **_settings(model), "base_model": base_model,
            "base_config": model.config.to_dict()}
    state = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_text(out / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")
    return out


def read_lora_config(path: str | os.PathLike) -> dict:
    """lora.json of an adapter directory, checked."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: file not found; is {path} a LoRA adapter directory "
                        "(written by save_lora / train.py --lora_rank)?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{file}: not a {FORMAT} adapter config")
    for key in ("rank", "alpha", "targets"):
        if key not in meta:
            raise UserError(f"{file}: missing key {key!r}")
    return meta


def load_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the adapters saved in directory ``path`` to ``model`` (a base GPT); returns it."""
    meta = read_lora_config(path)
    base = unwrap(model)
    expected = meta.get("base_config")
    if expected is not None:
        mismatch = {k: (v, getattr(base.config, k, None)) for k, v in expected.items()
                    if k != "dropout" and getattr(base.config, k, None) != v}
        if mismatch:
            k, (want, got) = next(iter(mismatch.items()))
            raise UserError(f"{path}: adapter was trained on a model with {k}={want}, but this "
                            f"base model has {k}={got} (base was {meta.get('base_model')!r})")
    try:
        # The recorded targets are full module names, so they select exactly the saved layers.
        apply_lora(model, int(meta["rank"]), float(meta["alpha"]), tuple(meta["targets"]))
    except ValueError as e:
        raise UserError(f"{Path(path) / ADAPTER_CONFIG}: {e}") from None
    tensors = load_safetensors(Path(path) / ADAPTER_WEIGHTS)
    params = dict(model.named_parameters())
    wanted = set(lora_state_dict(model))
    if set(tensors) != wanted:
        odd = sorted(set(tensors) ^ wanted)[0]
        raise UserError(f"{Path(path) / ADAPTER_WEIGHTS}: tensor {odd!r} does not match "
                        f"{ADAPTER_CONFIG}")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != params[name].shape:
                raise UserError(f"{Path(path) / ADAPTER_WEIGHTS}: {name} has shape "
                                f"{list(t.shape)}, expected {list(params[name].shape)}")
            params[name].copy_(t)
    return model


def load_lora_model(path: str | os.PathLike, base_model: str | os.PathLike | None = None,
                    device=None) -> nn.Module:
    """The base model named in ``path``'s lora.json (or ``base_model``) with the adapter added.

    What a resumed LoRA training run needs: its checkpoint's weights are merged, so the adapter
    must go back onto the original base, not onto them.
    """
    base = base_model or read_lora_config(path).get("base_model")
    if not base:
        raise UserError(f"{Path(path) / ADAPTER_CONFIG}: no base_model recorded; pass the base "
                        "model directory explicitly")
    return load_lora(load_model(base, device=device), path)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale * B A) and unwrap it, in place.

    Returns the plain GPT, with every parameter trainable again, ready for save_model.
    """
    model = unwrap(model)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            w = layer.base.weight
            w.copy_((w.float() + layer.delta_weight()).to(w.dtype))
            _set_module(model, name, layer.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merged_model(model: nn.Module) -> nn.Module:
    """A plain GPT computing what the adapted ``model`` computes; ``model`` is left as it is.

    Weights not adapted are shared with ``model`` (no copy); only adapted layers get new
    tensors. For saving a LoRA run's checkpoint as an ordinary model directory:
    ``save_model(merged_model(model), path)``.
    """
    model = unwrap(model)
    layers = lora_layers(model)
    state = {}
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            prefix, _, leaf = name.rpartition(".")
            if prefix in layers:  # the adapter itself: folded into the weight below
                continue
            if prefix.endswith(".base") and prefix[:-5] in layers:
                layer = layers[prefix[:-5]]
                name = f"{prefix[:-5]}.{leaf}"
                if leaf == "weight":
                    t = (t.float() + layer.delta_weight()).to(t.dtype)
            state[name] = t.detach()
    plain = meta_model(model.config)
    plain.load_state_dict(state, assign=True, strict=True)
    plain.lm_head.weight = plain.wte.weight  # assign=True replaced wte's parameter: tie again
    return plain.train(model.training)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, for a log line like 'training 0.24% of 124M'."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
