"""The model a run starts from: pretrained or fresh weights, dropout, LoRA adapters, frozen parts.

    model, lora_base = build_model(cfg, source, config, seed, log=print)

A LoRA run's checkpoints hold the merged weights (a plain model directory) plus ``adapter/``;
resuming puts that adapter back on the original base, so the run continues exactly where it
stopped. ``lora_base`` is that base's path (None without LoRA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..io.model_dir import load_model
from ..lora import (apply_lora, count_trainable, load_lora, merged_model, parse_targets,
                    read_lora_config, save_lora)
from ..model import GPT, GPTConfig, set_dropout
from .config import TrainConfig
from .run_dir import Source


def freeze_non_transformer(model: GPT) -> None:
    """--only_train_transformer_layers: only h.* trains; wte (also the tied head), wpe, ln_f stay."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("h."))


def _pretrained(path, dropout: float | None) -> GPT:
    model = load_model(path, device="cpu")
    if dropout is not None:
        set_dropout(model, dropout)
    return model


def _attach_lora(model: GPT, cfg: TrainConfig, source: Source, seed: int,
                 log: Callable) -> tuple[GPT, str]:
    adapter = source.model_dir / "adapter"
    if source.resume and (adapter / "lora.json").is_file():
        base = read_lora_config(adapter).get("base_model")
        if not base:
            raise UserError(f"{adapter / 'lora.json'}: no base_model to resume from")
        log(f"Loading LoRA base {base} and adapter {adapter}")
        model = load_lora(_pretrained(base, cfg.dropout), adapter)
    else:
        base = str(source.model_dir.resolve())
        try:
            targets = parse_targets(cfg.lora_targets)
            with torch.random.fork_rng(devices=[]):  # the run's seed fixes the adapters' init
                torch.manual_seed(seed)
                apply_lora(model, cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank, targets)
        except ValueError as e:
            raise UserError(f"--lora_targets: {e}") from None
    trainable, total = count_trainable(model)
    log(f"LoRA rank {cfg.lora_rank}: training {trainable:,} of {total:,} parameters")
    return model, base


def build_model(cfg: TrainConfig, source: Source, config: GPTConfig, seed: int,
                log: Callable) -> tuple[GPT, str | None]:
    """The model to train, on the CPU, and the LoRA base it adapts (None without LoRA)."""
    if source.fresh_init:
        log(f"Initializing a new model from {source.model_dir / 'hparams.json'}")
        torch.manual_seed(seed)
        model = GPT(config)
    else:
        log(f"Loading checkpoint {source.model_dir}")
        model = _pretrained(source.model_dir, cfg.dropout)
    lora_base = None
    if cfg.lora_rank:
        model, lora_base = _attach_lora(model, cfg, source, seed, log)
    if cfg.only_train_transformer_layers:
        freeze_non_transformer(model)
    return model, lora_base


def lora_checkpoint(model: GPT, lora_base: str) -> tuple[GPT, Callable[[Path], None]]:
    """What a LoRA run saves: the merged weights (the checkpoint stays a plain model
    directory) and a writer of ``adapter/`` beside them."""
    def write_adapter(checkpoint: Path) -> None:
        save_lora(model, checkpoint / "adapter", base_model=lora_base)

    return merged_model(model), write_adapter
