"""The model a run trains: pretrained or fresh weights, dropout, LoRA adapters, frozen parts,
then wrapped for the run (activation checkpointing, DDP/FSDP, compile) on its device.

    model = build_training_model(cfg, start, dist, log=print)
    model.parallel.train_model(x, targets=y)       # see gpt2.training.parallelize
    model.lora_base                                 # the LoRA base's path, or None

A LoRA run's checkpoints hold the merged weights (a plain model directory) plus ``adapter/``;
resuming puts that adapter back on the original base, so the run continues exactly where it
stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..attention import FLEX, use_document_masking
from ..attention import resolve as resolve_attention
from ..errors import UserError
from ..io.model_dir import load_model
from ..lora import (apply_lora, count_trainable, load_lora, merged_model, parse_targets,
                    read_lora_config, save_lora)
from ..model import GPT, GPTConfig, set_dropout
from ..runtime import backend_of, collective_backend, failed_allocation, resolve_precision
from . import memory
from .distributed import DistInfo
from .parallelize import Parallel, parallelize, parse_blocks
from .config import TrainConfig
from .run_dir import StartPoint
from .start import Start


def freeze_non_transformer(model: GPT) -> None:
    """--only_train_transformer_layers: only h.* trains; wte (also the tied head), wpe, ln_f stay."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("h."))


def _pretrained(path, dropout: float | None) -> GPT:
    model = load_model(path, device="cpu")
    if dropout is not None:
        set_dropout(model, dropout)
    return model


def _attach_lora(model: GPT, cfg: TrainConfig, source: StartPoint, seed: int,
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


def starting_model(cfg: TrainConfig, source: StartPoint, config: GPTConfig, seed: int,
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


@dataclass
class TrainingModel:
    """The model as this run trains it, and the choices that shaped it."""

    parallel: Parallel      # the GPT, its wrapped/compiled training module, its whole copy
    lora_base: str | None   # LoRA: the base model the adapters sit on
    precision: str          # fp32, bf16 or fp16 (resolved from --precision for the device)
    compiled: bool
    checkpointed: list[int]  # blocks that recompute their activations (--memory_saving_*)
    loss_chunk: int

    def describe(self, cfg: TrainConfig, dist: DistInfo) -> list[str]:
        """The lines printed once everything is built: the model, and the batch across ranks."""
        model, world = self.parallel.model, dist.world_size
        seq_len = model.config.n_ctx
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lines = [f"Model: {model.num_params():,} parameters ({n_train:,} trainable); "
                 f"{dist.device}, {self.precision}, {cfg.optimizer}, batch {cfg.batch_size} x "
                 f"{cfg.accumulate_gradients} x {seq_len} tokens"
                 + (", compiled" if self.compiled else "")
                 + (f", checkpointing {len(self.checkpointed)} blocks" if self.checkpointed
                    else "")]
        if not dist.enabled:
            if cfg.fsdp:
                lines.append("note: --fsdp has no effect in a one-process run (nothing to "
                             "shard across)")
            return lines
        windows = cfg.batch_size * world * cfg.accumulate_gradients
        lines.append(f"Distributed: {world} processes ({dist.launcher}, "
                     f"{'FSDP' if self.parallel.sharded else 'DDP'}, "
                     f"{collective_backend(dist.device)}); effective batch {cfg.batch_size} x "
                     f"{world} ranks x {cfg.accumulate_gradients} accumulation = {windows} "
                     f"windows = {windows * seq_len:,} tokens per update")
        lines.append(f"note: --learning_rate {cfg.learning_rate:g} applies to the gradient "
                     "averaged over the whole effective batch; it is not scaled with the number "
                     f"of processes. Scale it by hand if you want (e.g. x{world} linear or "
                     f"x{math.sqrt(world):.2f} square-root rule).")
        return lines


def out_of_memory_message(e: BaseException, cfg: TrainConfig, config: GPTConfig,
                          device: torch.device, world_size: int) -> str:
    """One line for an allocation that failed: what it asked for, what the run needs about."""
    precision = resolve_precision(cfg.precision, device)
    est = memory.estimate_memory(
        config, cfg.batch_size, precision="fp32" if precision == "fp32" else "bf16",
        optimizer=cfg.optimizer, activation_checkpointing=config.n_layer
        if cfg.memory_saving_gradients else 0, fsdp_world_size=world_size if cfg.fsdp else 1,
        trainable="transformer" if cfg.only_train_transformer_layers else "all",
        chunked_loss=cfg.loss_chunk > 0)
    asked = failed_allocation(e)
    return (f"out of memory on {device}: " + (f"an allocation of {asked} failed; " if asked
                                              else "")
            + f"this run needs about {memory.human(int(est.peak * memory.HEADROOM))} "
            f"(batch {cfg.batch_size} x {config.n_ctx}, {precision})"
            + memory.memory_advice(est, precision, cfg.memory_saving_gradients, cfg.batch_size,
                                   cfg.optimizer)
            + ("; without --skip_memory_check the run is refused before it starts"
               if cfg.skip_memory_check else ""))


def memory_summary(cfg: TrainConfig, config: GPTConfig, device: torch.device, precision: str,
                   checkpointed: int, world_size: int) -> str:
    """The memory estimate's line; UserError with advice when the run clearly cannot fit."""
    summary = memory.check_fits(
        config, cfg.batch_size, precision, cfg.optimizer, device,
        cfg.only_train_transformer_layers, checkpointed, config.n_ctx, cfg.skip_memory_check,
        fsdp_world_size=world_size if cfg.fsdp else 1, chunked_loss=cfg.loss_chunk > 0)
    return (f"Memory estimate ({device.type}, {precision}, batch {cfg.batch_size} x "
            f"{config.n_ctx}): {summary}")


def build_training_model(cfg: TrainConfig, start: Start, dist: DistInfo,
                         log: Callable[[str], None]) -> TrainingModel:
    """Check that the run fits (before anything large is allocated), load or initialise the
    weights, and wrap them for this run on its device."""
    precision = resolve_precision(cfg.precision, dist.device)
    try:
        blocks = (parse_blocks(cfg.memory_saving_blocks, start.config.n_layer)
                  if cfg.memory_saving_gradients else [])
    except ValueError as e:
        raise UserError(f"--memory_saving_blocks: {e}") from None
    log(memory_summary(cfg, start.config, dist.device, precision, len(blocks), dist.world_size))
    model, lora_base = starting_model(cfg, start.point, start.config, start.seed, log)
    compiled = cfg.compile if cfg.compile is not None else \
        backend_of(dist.device).compile_by_default
    try:
        if resolve_attention(cfg.packed_attention, dist.device) == FLEX:
            use_document_masking(model)
    except ValueError as e:
        raise UserError(f"--packed_attention {cfg.packed_attention}: {e}") from None
    parallel = parallelize(model.to(dist.device).train(), dist, fsdp=cfg.fsdp, compile=compiled,
                           checkpoint_blocks=blocks)
    return TrainingModel(parallel, lora_base, precision, compiled, blocks, cfg.loss_chunk)
