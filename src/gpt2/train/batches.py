"""A run's training batches: windows of its corpus, ``--noise`` on the inputs, on its device.

    batches = TextBatches.load(cfg, encoder, start, dist, log)   # encodes/reads the data once
    inputs, targets = batches.next()                             # [batch, n_ctx] each
    batches.val_batches                                          # fixed validation windows
    batches.sampler.state_dict(), batches.noise_rng              # what a checkpoint keeps

Each rank draws its own windows (the sampler's stream is told apart by rank). Another kind of
training data (examples with a loss mask, packed) is another class with the same ``next``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..data.sampler import Sampler, add_noise
from ..data.splits import TrainingData, training_data
from . import distributed
from .config import TrainConfig
from .distributed import DistInfo
from .start import Start


def load_training_data(cfg: TrainConfig, encoder, start: Start, dist: DistInfo,
                       log: Callable[[str], None]) -> TrainingData:
    """The run's data (gpt2.data.splits.training_data). Rank 0 encodes into the shared cache
    first; the other ranks then read it (no race, one progress bar)."""
    log("Loading dataset...")
    with distributed.rank_zero_first(dist):
        return training_data(
            cfg.dataset, cfg.val_dataset, encoder, start.config.n_vocab, start.config.n_ctx,
            combine=cfg.combine, encoding=cfg.encoding, val_every=cfg.val_every,
            val_fraction=cfg.val_fraction, val_batch_count=cfg.val_batch_count,
            val_batch_size=cfg.val_batch_size, log=log, quiet=not dist.is_main,
            text_field=cfg.text_field, split_eot=not cfg.literal_endoftext)


class TextBatches:
    """Uniformly drawn ``n_ctx`` windows of the training chunks, as (inputs, targets) tensors:
    the targets are the window itself (the model shifts them), the inputs the window with each
    token replaced by a random id with probability ``noise``."""

    def __init__(self, data: TrainingData, batch_size: int, n_ctx: int, n_vocab: int,
                 noise: float, seed: int, dist: DistInfo):
        self.data, self.val_batches = data, data.val_batches
        self.batch_size, self.n_ctx, self.n_vocab, self.noise = batch_size, n_ctx, n_vocab, noise
        self.device = dist.device
        self.sampler = Sampler(data.train, seed=seed, rank=dist.rank,
                               world_size=dist.world_size, name=f"dataset {data.train_path}")
        # Rank 0 keeps the one-process stream, so one process and rank 0 of many agree.
        self.noise_rng = np.random.default_rng([seed, 1] if dist.is_main else
                                               [seed, 1, dist.rank])

    @classmethod
    def load(cls, cfg: TrainConfig, encoder, start: Start, dist: DistInfo,
             log: Callable[[str], None]) -> TextBatches:
        return cls(load_training_data(cfg, encoder, start, dist, log), cfg.batch_size,
                   start.config.n_ctx, start.config.n_vocab, cfg.noise, start.seed, dist)

    @property
    def tokens(self) -> int:
        """Tokens per batch."""
        return self.batch_size * self.n_ctx

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = np.asarray(self.sampler.sample_batch(self.batch_size, self.n_ctx), dtype=np.int64)
        targets = torch.from_numpy(batch).to(self.device)
        inputs = torch.from_numpy(add_noise(batch, self.noise, self.noise_rng, self.n_vocab))
        return inputs.to(self.device), targets
