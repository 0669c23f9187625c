"""Preference pairs as training batches: each pair's chosen and rejected sequences packed in one
row, each attending only to itself, pairs packed into rows of n_ctx; resumable as examples are.

    batches = PairBatches(train, val, cfg, n_ctx, n_vocab, eot, seed, dist)
    batch = batches.next()     # PairBatch: inputs, targets, segments + which sequence each token
                               # belongs to (2k: pair k's chosen, 2k + 1: its rejected), which
                               # tokens are answers, the pairs' dataset indices

The interface is :class:`~.batches.ExampleBatches`' (``next``, state, ``val_batches``,
``sample_prompts``, ``chats``), so the loop does not ask which it has; what a batch means is
the objective's business (:mod:`.objectives`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..data.examples import IGNORE
from ..data.preferences import Pair, PairSet, load_pairs
from .batches import Batch, ExampleBatches, read_splits
from .config import TrainConfig
from .distributed import DistInfo
from .start import Start


@dataclass
class PairBatch(Batch):
    """A Batch of packed pairs. ``sequences`` [B, T]: the sequence of each token (-1: padding),
    pair k's chosen 2k and rejected 2k + 1; ``answers`` [B, T]: the token is in an answer;
    ``pairs`` [P]: each pair's index in its dataset; ``reference`` [2P] (or None): the
    reference model's log-probabilities of the sequences, when they were computed once."""

    sequences: torch.Tensor | None = None
    answers: torch.Tensor | None = None
    pairs: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    count: int = 0  # sequences in the batch

    def to(self, device: torch.device) -> PairBatch:
        def move(t):
            return None if t is None else t.to(device)
        return PairBatch(move(self.inputs), move(self.targets), move(self.segments),
                         move(self.sequences), move(self.answers), move(self.pairs),
                         move(self.reference), self.count)


def collate_sequences(rows: list[list[tuple[np.ndarray, int]]], width: int, pad: int
                      ) -> PairBatch:
    """Rows of (ids, prompt length) sequences -> one batch ``width`` tokens wide, sequence s
    of the batch (counted across rows) marked s in ``sequences``. Every token but a sequence's
    first is a target (what whole-sequence losses, such as ORPO's, score); ``answers`` says
    which of them are past the prompt."""
    shape = (len(rows), width)
    inputs, targets = np.full(shape, pad, np.int64), np.full(shape, IGNORE, np.int64)
    segments, sequences = np.full(shape, -1, np.int64), np.full(shape, -1, np.int64)
    answers = np.zeros(shape, bool)
    s = 0
    for r, row in enumerate(rows):
        at = 0
        for ids, prompt_len in row:
            n = len(ids)
            inputs[r, at:at + n] = ids
            targets[r, at + 1:at + n] = ids[1:]
            segments[r, at:at + n] = sequences[r, at:at + n] = s
            answers[r, at + prompt_len:at + n] = True
            at, s = at + n, s + 1
    return PairBatch(torch.from_numpy(inputs), torch.from_numpy(targets),
                     torch.from_numpy(segments), torch.from_numpy(sequences),
                     torch.from_numpy(answers), count=s)


def collate_pairs(rows: list[list[Pair]], width: int, pad: int,
                  reference: np.ndarray | None = None) -> PairBatch:
    """Rows of pairs -> one PairBatch: pair k's chosen is sequence 2k, its rejected 2k + 1."""
    batch = collate_sequences([[(ids, p.prompt_len) for p in row for ids in (p.chosen, p.rejected)]
                               for row in rows], width, pad)
    indices = [p.index for row in rows for p in row]
    batch.pairs = torch.tensor(indices, dtype=torch.long)
    if reference is not None:
        batch.reference = torch.from_numpy(
            reference[np.asarray(indices)].reshape(-1).astype(np.float32))
    return batch


class PairBatches(ExampleBatches):
    """Preference pairs in shuffled epochs, as :class:`~.batches.ExampleBatches` draws examples
    (the same epochs, rows and resumable state); a pair is never split across rows."""

    def __init__(self, train: PairSet, val: PairSet | None, cfg: TrainConfig, n_ctx: int,
                 n_vocab: int, eot: int, seed: int, dist: DistInfo):
        self.pair_sets = {"train": train, "val": val}
        self.reference: dict[str, np.ndarray] | None = None  # set by the objective if needed
        super().__init__(train, val, cfg, n_ctx, n_vocab, eot, seed, dist)

    def collate(self, rows: list[list[Pair]], width: int, validation: bool = False
                ) -> PairBatch:
        ref = None if self.reference is None else self.reference["val" if validation else "train"]
        return collate_pairs(rows, width, self.pad, ref)

    def all_batches(self, which: str, batch_size: int) -> list[PairBatch]:
        """Every pair of the ``which`` ("train" or "val") set in order, one pair a row: what
        the reference log-probs are computed over."""
        pairs = self.pair_sets[which].pairs
        return [collate_pairs([[p] for p in pairs[i:i + batch_size]],
                              max(len(p) for p in pairs[i:i + batch_size]), self.pad)
                for i in range(0, len(pairs), batch_size)]

    def sample_prompts(self, n: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, chosen answer ids) of the first ``n`` held-out pairs."""
        pairs = (self.pair_sets["val"] or self.pair_sets["train"]).pairs[:n]
        return [(p.chosen[:p.prompt_len].tolist(), p.chosen[p.prompt_len:].tolist())
                for p in pairs]


def load_pair_batches(cfg: TrainConfig, encoder, template, start: Start, dist: DistInfo,
                      log: Callable[[str], None]) -> PairBatches:
    """The run's preference pairs (:func:`~.batches.read_splits`), fitted into n_ctx and
    batched."""
    n_ctx = start.config.n_ctx
    log("Loading preference pairs...")
    train, val = read_splits(cfg, lambda path: load_pairs(
        path, encoder, template, n_ctx=n_ctx, drop_long=cfg.drop_long), "pairs", log)
    return PairBatches(train, val, cfg, n_ctx, start.config.n_vocab, encoder.eot_token,
                       start.seed, dist)
