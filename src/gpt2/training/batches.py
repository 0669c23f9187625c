"""A run's training batches, on its device: windows of a text corpus (with ``--noise``), or
instruction and chat examples (answers learned, packed without cross-talk), resumable.

    batches = load_batches(cfg, encoder, template, start, dist, log)   # reads/encodes once
    batch = batches.next()                    # Batch(inputs, targets, segments)
    batches.val_batches                       # fixed validation Batches
    batches.state_dict(), batches.noise_rng   # what a checkpoint keeps

Each rank draws its own windows or examples. Both kinds have the same ``next``, state,
``val_batches``, ``sample_prompts`` and ``chats`` (whether they went through the chat
template): the training loop does not ask which it has.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..data.examples import IGNORE, Example, ExampleSet, dataset_format, load_examples
from ..data.sampler import Sampler, add_noise
from ..data.splits import TrainingData, find_corpus_splits, training_data
from ..errors import UserError
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

    sample_prompts = None  # training samples start from <|endoftext|>
    chats = False          # nothing here went through a chat template

    def __init__(self, data: TrainingData, batch_size: int, n_ctx: int, n_vocab: int,
                 noise: float, seed: int, dist: DistInfo):
        self.data = data
        self.val_batches = [Batch(torch.from_numpy(np.asarray(b, dtype=np.int64)),
                                  torch.from_numpy(np.asarray(b, dtype=np.int64)))
                            for b in data.val_batches]
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

    def next(self) -> Batch:
        batch = np.asarray(self.sampler.sample_batch(self.batch_size, self.n_ctx), dtype=np.int64)
        targets = torch.from_numpy(batch).to(self.device)
        inputs = torch.from_numpy(add_noise(batch, self.noise, self.noise_rng, self.n_vocab))
        return Batch(inputs.to(self.device), targets)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class Batch:
    """What one forward of the training model takes: token rows, what each position predicts
    (-100: nothing), and for packed examples which example each token belongs to."""

    inputs: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device),
                     None if self.segments is None else self.segments.to(device))


def pack_rows(examples: list[Example], n_ctx: int, packing: bool) -> list[list[Example]]:
    """Rows of at most ``n_ctx`` tokens: best-fit decreasing (longest example first, each into
    the fullest row that still has room for it; TRL's "bfd"), which leaves a few percent of a
    row empty where filling rows in order leaves ~15%. Without ``packing``: one example a row,
    in order."""
    if not packing:
        return [[example] for example in examples]
    rows: list[list[Example]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted: rows that can take more
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i])):  # stable
        n = len(examples[i])
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, r = rooms.pop(k)
        else:
            room, r = n_ctx, len(rows)
            rows.append([])
        rows[r].append(examples[i])
        if room > n:
            bisect.insort(rooms, (room - n, r))
    return rows


def collate(rows: list[list[Example]], width: int, pad: int, answers: bool = False) -> Batch:
    """Rows of examples -> one Batch ``width`` tokens wide; padding is its own segment (-1),
    attends only to padding and is never a target. ``answers``: the answers-only targets
    (validation), whatever training learns."""
    inputs = np.full((len(rows), width), pad, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
    segments = np.full((len(rows), width), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for s, example in enumerate(row):
            inputs[r, at:at + len(example)] = example.ids
            targets[r, at:at + len(example)] = example.answer_targets if answers else \
                example.targets
            segments[r, at:at + len(example)] = s
            at += len(example)
    return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(segments))


class ExampleBatches:
    """Instruction/chat examples in shuffled epochs, packed into ``n_ctx`` rows (each example
    attending only to itself, positions from 0: gpt2.model's ``segments``) or one per row padded
    to the longest of its batch. The epoch's rows are the same on every rank, and each rank
    takes every world_size-th; the state (epoch, row) resumes every rank's stream exactly."""

    def __init__(self, train: ExampleSet, val: ExampleSet | None, cfg: TrainConfig, n_ctx: int,
                 n_vocab: int, eot: int, seed: int, dist: DistInfo):
        if len(train.examples) < dist.world_size:
            raise UserError(f"{len(train.examples)} examples cannot be shared by "
                            f"{dist.world_size} processes")
        self.examples, self.val, self.chats = train.examples, val, train.chats
        self.batch_size, self.n_ctx, self.n_vocab, self.pad = cfg.batch_size, n_ctx, n_vocab, eot
        self.packing = cfg.packing is not False
        self.noise, self.seed, self.rank, self.world = cfg.noise, seed, dist.rank, dist.world_size
        self.device = dist.device
        self.epoch = self.position = 0
        self._rows = self.rows(0)
        self.noise_rng = np.random.default_rng([seed, 1] if dist.is_main else
                                               [seed, 1, dist.rank])
        self.val_batches = self._val_batches(cfg) if val is not None else []

    def rows(self, epoch: int) -> list[list[Example]]:
        """This rank's rows in ``epoch``: all examples in a permutation of the epoch, packed
        (the same rows on every rank), the rows shuffled (packing sorts them by length), and
        every world-th of them. Every rank gets as many (the last few wrap around to the
        epoch's first rows), so one (epoch, position) is every rank's place in its stream."""
        perm = np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.examples))
        rows = pack_rows([self.examples[i] for i in perm], self.n_ctx, self.packing)
        if self.packing:
            rows = [rows[i] for i in np.random.default_rng([self.seed, 3, epoch])
                    .permutation(len(rows))]
        share = -(-len(rows) // self.world)
        return [rows[(self.rank + self.world * k) % len(rows)] for k in range(share)]

    @property
    def tokens(self) -> int:
        return self.batch_size * self.n_ctx

    def steps_per_epoch(self, accumulate: int) -> int:
        """Updates in one epoch (epoch 0's rows of this rank; every rank has as many)."""
        rows = len(self._rows) if self.epoch == 0 else len(self.rows(0))
        return max(1, -(-rows // (self.batch_size * accumulate)))

    def _take(self) -> list[Example]:
        """The next row of the stream (the next epoch's first at an epoch's end)."""
        if self.position >= len(self._rows):
            self.epoch, self.position = self.epoch + 1, 0
            self._rows = self.rows(self.epoch)
        self.position += 1
        return self._rows[self.position - 1]

    def collate(self, rows: list[list[Example]], width: int, validation: bool = False
                ) -> Batch:
        """Rows -> one batch (validation: the answers-only targets); batches of other items
        (preference pairs) override this alone."""
        return collate(rows, width, self.pad, answers=validation)

    def next(self) -> Batch:
        rows = [self._take() for _ in range(self.batch_size)]
        width = self.n_ctx if self.packing else max(sum(map(len, r)) for r in rows)
        batch = self.collate(rows, width)
        if self.noise:
            batch.inputs = torch.from_numpy(add_noise(batch.inputs.numpy(), self.noise,
                                                      self.noise_rng, self.n_vocab))
        return batch.to(self.device)

    def _val_batches(self, cfg: TrainConfig) -> list[Batch]:
        rows = pack_rows(self.val.examples, self.n_ctx, self.packing)
        # best-fit sorts rows by length: a fixed shuffle, so that the rows kept are a sample
        rows = [rows[i] for i in np.random.default_rng(4).permutation(len(rows))]
        rows = rows[:cfg.val_batch_count * cfg.val_batch_size]
        self.val_rows = [rows[i:i + cfg.val_batch_size]
                         for i in range(0, len(rows), cfg.val_batch_size)]
        return self.collate_val()

    def collate_val(self) -> list[Batch]:
        """The fixed validation batches (made again when what they carry changes)."""
        return [self.collate(r, self.n_ctx if self.packing else max(sum(map(len, x)) for x in r),
                             validation=True) for r in self.val_rows]

    def sample_prompts(self, n: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, reference answer ids) of the first ``n`` held-out examples (training
        ones without validation): everything before the last learned run, and that run."""
        out = []
        for example in (self.val or ExampleSet(self.examples, "")).examples[:n]:
            learned = np.flatnonzero(example.answer_targets != IGNORE)
            start = int(learned[-1])
            while start - 1 in set(learned.tolist()):
                start -= 1
            out.append((example.ids[:start].tolist(), example.ids[start:].tolist()))
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "unit": "row",
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._rows = self.rows(self.epoch)
        if state.get("unit") != "row":  # saved before rows were shared out: examples counted
            share = len(self.examples) / self.world
            self.position = round(self.position * len(self._rows) / share)
        self.position = min(self.position, len(self._rows))


def read_splits(cfg: TrainConfig, read: Callable, noun: str, log: Callable[[str], None]):
    """The run's training and validation sets (any set with ``examples``, ``describe`` and
    ``with_items``): --dataset (its train/ and valid/ folders when it has them), --val_dataset,
    or a fixed, seeded --val_fraction of the training items held out whole."""
    train_path, val_path = cfg.dataset, cfg.val_dataset
    splits = find_corpus_splits(cfg.dataset) if os.path.isdir(cfg.dataset) else None
    if splits:
        train_path = str(splits["train"])
        val_path = val_path or (str(splits["valid"]) if splits.get("valid") else None)
    train = read(train_path)
    log(train.describe(f"dataset {train_path}"))
    if not cfg.val_every:
        return train, None
    if val_path is not None:
        val = read(val_path)
        log(val.describe(f"validation dataset {val_path}"))
        return train, val
    if cfg.val_fraction <= 0:
        log(f"validation uses the training {noun} (set --val_dataset or --val_fraction to hold "
            "some out)")
        return train, train
    items = train.examples
    n, k = len(items), int(round(len(items) * cfg.val_fraction))
    if not 0 < k < n:
        raise UserError(f"--val_fraction {cfg.val_fraction} of {n} {noun} leaves nothing to "
                        f"{'validate on' if k == 0 else 'train on'}")
    held = set(np.random.default_rng(1).permutation(n)[:k].tolist())
    log(f"validation: holding out {k:,} of {n:,} {noun}")
    return (train.with_items([e for i, e in enumerate(items) if i not in held]),
            train.with_items([e for i, e in enumerate(items) if i in held]))


def load_example_batches(cfg: TrainConfig, encoder, template, start: Start, dist: DistInfo,
                         log: Callable[[str], None]) -> ExampleBatches:
    """The run's examples (:func:`read_splits`), fitted into n_ctx and batched."""
    n_ctx = start.config.n_ctx
    read = dict(encoder=encoder, template=template, n_ctx=n_ctx, fmt=cfg.data_format,
                train_on_prompt=cfg.train_on_prompt, drop_long=cfg.drop_long)
    log("Loading examples...")
    train, val = read_splits(cfg, lambda path: load_examples(path, **read), "examples", log)
    return ExampleBatches(train, val, cfg, n_ctx, start.config.n_vocab, encoder.eot_token,
                          start.seed, dist)


def load_batches(cfg: TrainConfig, encoder, template, start: Start, dist: DistInfo,
                 log: Callable[[str], None]) -> TextBatches | ExampleBatches:
    """Windows of text, or examples: what the dataset holds (or --data_format says)."""
    if dataset_format(cfg.dataset, cfg.data_format) == "text":
        if cfg.epochs is not None:
            raise UserError("--epochs counts passes over examples; a text dataset trains for "
                            "--max_steps")
        return TextBatches.load(cfg, encoder, start, dist, log)
    return load_example_batches(cfg, encoder, template, start, dist, log)
