"""Held-out data and the rules of a run's data: train/valid/test folders, held-out tokens.

    splits = find_corpus_splits("corpus/")     # {"train": ..., "valid": ..., "test": ...} or None
    train, val, message = split_validation(chunks, 0.05)
    data = training_data("corpus/", None, encoder, n_vocab, n_ctx, ...)   # what train.py reads
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from .dataset import check_vocab, load_dataset
from .sampler import check_window, validation_batches
from .tokens import TokenChunks


def find_corpus_splits(path: str | os.PathLike) -> dict | None:
    """``{"train", "valid", "test"}`` folders of a corpus directory laid out as splits, else None.

    Recognised: a directory with ``train/`` and at least one of ``valid/`` (or ``val/``) and
    ``test/``. Missing splits are None.
    """
    p = Path(os.path.expanduser(str(path)))
    if not (p / "train").is_dir():
        return None
    valid = next((p / n for n in ("valid", "val") if (p / n).is_dir()), None)
    test = p / "test" if (p / "test").is_dir() else None
    if valid is None and test is None:
        return None
    return {"train": p / "train", "valid": valid, "test": test}


def split_validation(chunks, fraction: float, seed: int = 1
                     ) -> tuple[TokenChunks, TokenChunks, str]:
    """Hold out the last ``fraction`` of the tokens for validation: whole shards when the
    data is several ``.bin`` shards (the fewest last ones that hold that much, one at least
    left to train on), else cut out of the last chunks.

    The split is positional, so the same data always gives the same split; ``seed`` is accepted
    for interface compatibility and does not change it.
    """
    if not 0 < fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {fraction}")
    chunks = TokenChunks.of(chunks)
    total = chunks.n_tokens
    n_val = int(round(total * fraction))
    if n_val == 0 or n_val == total:
        raise UserError(f"--val_fraction {fraction} of {total} tokens leaves nothing to "
                        f"{'validate on' if n_val == 0 else 'train on'}")
    if chunks.shards:
        held = _hold_out_shards(chunks, n_val)
        if held is not None:
            return held
    lengths = chunks.lengths
    from_end = np.cumsum(lengths[::-1])
    k = int(np.searchsorted(from_end, n_val))      # chunks reached from the end, minus one
    s = len(lengths) - 1 - k                        # the chunk the cut falls in
    cut = n_val - (int(from_end[k - 1]) if k else 0)  # its tokens that go to validation
    train = chunks.select(np.arange(s + (cut < lengths[s])))
    if cut < lengths[s]:
        train = train.with_lengths(train.start, np.concatenate([train.lengths[:-1],
                                                                [lengths[s] - cut]]))
    val = chunks.select(np.arange(s, len(lengths)))
    val = val.with_lengths(np.concatenate([[chunks.start[s] + lengths[s] - cut], val.start[1:]]),
                           np.concatenate([[cut], val.lengths[1:]]))
    message = (f"validation: holding out the last {fraction:.1%} of the data, "
               f"{n_val:,} of {total:,} tokens ({len(val)} chunk{'s' * (len(val) != 1)}); "
               f"training on {total - n_val:,}")
    return train, val, message


def _hold_out_shards(chunks: TokenChunks, n_val: int):
    per_file = np.bincount(chunks.file, weights=chunks.lengths, minlength=len(chunks.arrays))
    from_end = np.cumsum(per_file[::-1])
    k = int(np.searchsorted(from_end, n_val)) + 1   # the fewest last shards holding n_val
    if k >= len(per_file):
        return None  # they would leave nothing to train on: cut tokens instead
    first = len(per_file) - k
    val_mask = chunks.file >= first
    held = int(per_file[first:].sum())
    names = ", ".join(Path(n).name for n in chunks.names[first:][:3]) + (", ..." if k > 3 else "")
    message = (f"validation: holding out the last {k} of {len(per_file)} shards ({names}), "
               f"{held:,} of {chunks.n_tokens:,} tokens; training on {chunks.n_tokens - held:,}")
    return chunks.select(~val_mask), chunks.select(val_mask), message


@dataclass
class TrainingData:
    """What a training run reads: its chunks, and fixed validation batches (maybe none)."""

    train: TokenChunks
    train_path: str
    val_batches: list[np.ndarray]


def training_data(dataset: str, val_dataset: str | None, encoder, n_vocab: int, n_ctx: int, *,
                  combine: int, encoding: str, val_every: int, val_fraction: float,
                  val_batch_count: int, val_batch_size: int, log: Callable[[str], None],
                  quiet: bool = False, text_field: str = "text",
                  split_eot: bool = True) -> TrainingData:
    """The training chunks and validation batches of a run, with every rule about them.

    A corpus directory's ``valid/`` split validates unless ``val_dataset`` is given; otherwise
    the last ``val_fraction`` of the tokens is held out (0: validate on the training data, as
    the original did). Every token must be in the model's vocabulary and some chunk must hold
    a whole ``n_ctx`` window.
    """
    train_path, val_path = dataset, val_dataset
    splits = find_corpus_splits(dataset) if os.path.isdir(dataset) else None
    if splits:
        train_path = str(splits["train"])
        if val_path is None and splits.get("valid") is not None:
            val_path = str(splits["valid"])
    read = dict(combine=combine, encoding=encoding, quiet=quiet, text_field=text_field,
                split_eot=split_eot)
    chunks = load_dataset(train_path, encoder, **read)
    check_vocab(chunks, n_vocab, train_path)
    _check_fingerprint(chunks, encoder, train_path, log)
    check_window(chunks, n_ctx, f"dataset {train_path}")  # early: before the model is built
    val_chunks = None
    if val_every:
        if val_path is not None:
            log(f"Loading validation dataset {val_path}...")
            val_chunks = load_dataset(val_path, encoder, **read)
            check_vocab(val_chunks, n_vocab, val_path)
            _check_fingerprint(val_chunks, encoder, val_path, log)
        elif val_fraction > 0:
            chunks, val_chunks, message = split_validation(chunks, val_fraction)
            log(message)
        else:
            val_chunks = chunks
            log("validation uses the training data (set --val_dataset or --val_fraction to "
                "hold some out)")
    batches = []
    if val_chunks is not None:
        batches = validation_batches(val_chunks, val_batch_count, val_batch_size, n_ctx, seed=1,
                                     name=f"validation data {val_path or train_path}")
    return TrainingData(chunks, train_path, batches)


def _check_fingerprint(chunks: TokenChunks, encoder, path: str, log) -> None:
    """Token files say which encoder made them. Equal tokenizers can be stored as different
    bytes (encoder.json and HF's vocab.json), so a mismatch is a warning, not an error."""
    mine = getattr(encoder, "fingerprint", None)
    others = sorted(chunks.fingerprints - {mine})
    if mine and others:
        log(f"warning: dataset {path} was encoded with another tokenizer (fingerprint "
            f"{others[0][:12]}..., the model's is {mine[:12]}...); its ids may stand for "
            "other text than the model expects")
