"""What the training loop measures on a schedule: the validation loss and samples.

    validation = Validation(batches.val_batches, model, dist)
    loss = validation.run(stop)              # None: a stop was requested during the pass
    texts = training_samples(model, encoder, cfg, start, step, dist)

Both run the model as built (uncompiled, in eval mode) across every rank: under FSDP each
forward is a collective, so every rank runs as many batches, and the result is shared.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..runtime import autocast
from ..sampling import sample_sequence
from . import distributed
from .build import TrainingModel
from .config import TrainConfig
from .distributed import DistInfo


class Validation:
    """The mean loss over fixed validation batches, shared out across the ranks."""

    def __init__(self, batches: list[np.ndarray], model: TrainingModel, dist: DistInfo,
                 log: Callable[[str], None]):
        self.batches, self.model, self.dist, self.log = batches, model, dist, log

    def __bool__(self) -> bool:
        return bool(self.batches)

    @torch.no_grad()
    def run(self, stop) -> float | None:
        """The loss; None as soon as ``stop.requested`` is set on any rank (Ctrl-C stops
        within a batch, not after the whole pass)."""
        self.log("Calculating validation loss...")
        batches, parallel, device = self.batches, self.model.parallel, self.dist.device
        model = parallel.eval_model
        model.eval()
        total = count = 0.0
        try:
            for i in tqdm(distributed.my_share(len(batches), self.dist),
                          disable=not self.dist.is_main):
                if distributed.broadcast_flag(stop.requested, self.dist):
                    return None
                tokens = torch.from_numpy(np.asarray(batches[min(i, len(batches) - 1)],
                                                     dtype=np.int64)).to(device)
                with parallel.synced(training=False), autocast(device, self.model.precision):
                    loss = model(tokens, targets=tokens, loss_chunk=self.model.loss_chunk).item()
                if i < len(batches):  # padding batches (FSDP) run but count zero
                    total, count = total + loss, count + 1
        finally:
            model.train()
        # mean(sum) / mean(count) over ranks = sum / count over all batches
        return distributed.all_reduce_mean(total, self.dist) / \
            distributed.all_reduce_mean(count, self.dist)


def training_samples(model: TrainingModel, encoder, cfg: TrainConfig, seed: int, step: int,
                     length: int, dist: DistInfo) -> list[str]:
    """``--sample_num`` samples of ``length`` tokens from ``<|endoftext|>``, in batches of
    ``--batch_size``; the same texts on every rank (a seed per step and sample)."""
    top_k, top_p = (0, cfg.top_p) if cfg.top_p > 0 else (cfg.top_k, 1.0)
    texts: list[str] = []
    while len(texts) < cfg.sample_num:
        n = min(cfg.batch_size, cfg.sample_num - len(texts))
        # The original seeded each sample with one random data token; <|endoftext|> is what a
        # document start looks like, and it keeps the data sampler's RNG untouched.
        context = torch.full((n, 1), encoder.eot_token, dtype=torch.long, device=dist.device)
        with model.parallel.synced(training=False), autocast(dist.device, model.precision):
            # Under FSDP every rank must run the (sharded) forward; same seed, same text.
            out = sample_sequence(model.parallel.eval_model, length, context, temperature=1.0,
                                  top_k=top_k, top_p=top_p,
                                  seed=seed * 1_000_003 + step * 1009 + len(texts))
        texts += [encoder.decode(row[1:].tolist()) for row in out]
    return texts
