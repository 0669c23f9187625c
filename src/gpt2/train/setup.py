"""The parts of a run's setup that are decisions rather than steps: seeds, the loss chunk, the
memory check, the data, resuming every rank's random streams, and the lines that describe it.

    seed = choose_seed(cfg.seed, state, dist)
    restore_rngs(state, dist, noise_rng, log)
    for line in describe_run(...): log(line)
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.splits import TrainingData, training_data
from ..model import GPT, GPTConfig
from ..runtime import collective_backend
from . import distributed, memory
from .config import TrainConfig
from .distributed import DistInfo
from .state import set_rng_state


def choose_seed(seed: int | None, state: dict | None, dist: DistInfo) -> int:
    """A resumed run keeps its seed; else --seed, else a random one. The same on every rank:
    a fresh model must start identical everywhere (FSDP does not broadcast), and each rank's
    data stream is then told apart by its rank alone."""
    chosen = state["seed"] if state else (
        seed if seed is not None else random.SystemRandom().randrange(2**31))
    return distributed.broadcast_object(chosen, dist)


def seed_globals(seed: int) -> None:
    """Same seed, same run: dropout and anything else drawing from the global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def restore_rngs(state: dict, dist: DistInfo, noise_rng: np.random.Generator,
                 log: Callable[[str], None]) -> None:
    """Each rank's own RNGs when the run resumes on as many ranks as it was saved from;
    otherwise rank 0's, and the other ranks keep the streams they were seeded with."""
    ranks = state.get("ranks") or [{k: state[k] for k in ("noise_rng", "rng") if k in state}]
    rank, world = dist.rank, dist.world_size
    if len(ranks) != world:
        log(f"note: the checkpoint was saved by {len(ranks)} process(es), this run has {world}: "
            "weights, optimizer, step and data position resume, per-rank random streams restart")
    own = ranks[rank] if len(ranks) == world else (ranks[0] if rank == 0 else {})
    if "noise_rng" in own:
        noise_rng.bit_generator.state = own["noise_rng"]
    if "rng" in own:
        set_rng_state(own["rng"])


def memory_summary(cfg: TrainConfig, config: GPTConfig, device: torch.device, precision: str,
                   checkpointed: int, world_size: int, loss_chunk: int) -> str:
    """The memory estimate's line; UserError with advice when the run clearly cannot fit."""
    summary = memory.check_fits(
        config, cfg.batch_size, precision, cfg.optimizer, device,
        cfg.only_train_transformer_layers, checkpointed, config.n_ctx, cfg.skip_memory_check,
        fsdp_world_size=world_size if cfg.fsdp else 1, chunked_loss=loss_chunk > 0)
    return (f"Memory estimate ({device.type}, {precision}, batch {cfg.batch_size} x "
            f"{config.n_ctx}): {summary}")


def describe_run(cfg: TrainConfig, dist: DistInfo, model: GPT, precision: str, compiled: bool,
                 blocks: list[int], sharded: bool) -> list[str]:
    """The lines printed once everything is built: the model, and the batch across ranks."""
    world, seq_len = dist.world_size, model.config.n_ctx
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [f"Model: {model.num_params():,} parameters ({n_train:,} trainable); "
             f"{dist.device}, {precision}, {cfg.optimizer}, batch {cfg.batch_size} x "
             f"{cfg.accumulate_gradients} x {seq_len} tokens"
             + (", compiled" if compiled else "")
             + (f", checkpointing {len(blocks)} blocks" if blocks else "")]
    if not dist.enabled:
        if cfg.fsdp:
            lines.append("note: --fsdp has no effect in a one-process run (nothing to shard "
                         "across)")
        return lines
    windows = cfg.batch_size * world * cfg.accumulate_gradients
    backend = collective_backend(dist.device)
    lines.append(f"Distributed: {world} processes ({dist.launcher}, "
                 f"{'FSDP' if sharded else 'DDP'}, {backend}); effective batch "
                 f"{cfg.batch_size} x {world} ranks x {cfg.accumulate_gradients} accumulation = "
                 f"{windows} windows = {windows * seq_len:,} tokens per update")
    lines.append(f"note: --learning_rate {cfg.learning_rate:g} applies to the gradient averaged "
                 "over the whole effective batch; it is not scaled with the number of processes. "
                 f"Scale it by hand if you want (e.g. x{world} linear or "
                 f"x{math.sqrt(world):.2f} square-root rule).")
    return lines


def load_training_data(cfg: TrainConfig, encoder, config: GPTConfig, dist: DistInfo,
                       log: Callable[[str], None]) -> TrainingData:
    """The run's data (gpt2.data.splits.training_data). Rank 0 encodes into the shared cache
    first; the other ranks then read it (no race, one progress bar)."""
    with distributed.rank_zero_first(dist):
        return training_data(
            cfg.dataset, cfg.val_dataset, encoder, config.n_vocab, config.n_ctx,
            combine=cfg.combine, encoding=cfg.encoding, val_every=cfg.val_every,
            val_fraction=cfg.val_fraction, val_batch_count=cfg.val_batch_count,
            val_batch_size=cfg.val_batch_size, log=log, quiet=not dist.is_main,
            text_field=cfg.text_field, split_eot=not cfg.literal_endoftext)


def space_warning(cfg: TrainConfig, model: GPT, run_dir: Path) -> str | None:
    """Said early: the disk will not hold a checkpoint (weights + optimizer state), about."""
    slots = {"adam": 2, "adamw": 2, "sgd": 0, "adafactor": 0.1}[cfg.optimizer]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = int(weights * (1 + slots)) + (1 << 20)
    free = shutil.disk_usage(run_dir).free
    if free >= needed:
        return None
    return (f"warning: {run_dir} has {free / 1e6:.0f} MB free, but a checkpoint of this run "
            f"needs about {needed / 1e6:.0f} MB: saves will fail; free some space or pick "
            "another --checkpoint_dir")
