"""Train a GPT-2-style byte-level BPE vocabulary on your own corpus (``gpt2 tokenizer train``).

    python -m gpt2 tokenizer train corpus/ --vocab_size 8192 --out models/my-tok
    python -m gpt2 train --dataset corpus/ --model_dir models/my-tok --restore_from fresh

Trains with Hugging Face ``tokenizers`` using GPT-2's pre-tokenizer (ByteLevel, no prefix space)
and writes OpenAI's files, so every GPT-2 tool reads them:

- ``encoder.json``: ids equal merge priority, as in GPT-2: the 256 byte tokens first in GPT-2's
  byte order, then one token per merge in rank order, then ``<|endoftext|>`` last;
- ``vocab.bpe``: ``#version: 0.2`` then the merges in rank order;
- ``hparams.json``: ``n_vocab`` (including ``<|endoftext|>``) and a default 124M-shaped
  architecture (override with ``--n_ctx --n_embd --n_head --n_layer``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

from ..data.encode import PIECE_CHARS, pieces
from ..data.sources import PRE_ENCODED, documents, expand_paths
from ..errors import UserError
from ..io.atomic import write_text
from .bpe import EOT, bytes_to_unicode, gpt2_byte_order


def corpus_texts(paths: list[Path], encoding: str) -> Iterator[str]:
    """Every document of the corpus, in ~256K-character pieces cut where the pre-tokenizer
    splits anyway (so a huge file never has to be one string)."""
    for path in paths:
        if path.suffix.lower() in PRE_ENCODED:
            raise UserError(f"{path}: tokenizers train on text, not pre-encoded tokens")
        for doc in documents(path, encoding):
            for text, _, _ in pieces(doc, PIECE_CHARS, splittable=True):
                if text:
                    yield text


def _merges(tokenizer) -> list[tuple[str, str]]:
    model = json.loads(tokenizer.to_str())["model"]
    # tokenizers >= 0.20 stores [a, b]; older versions "a b".
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def train_tokenizer(paths: str | os.PathLike | Iterable[str | os.PathLike], vocab_size: int,
                    out_dir: str | os.PathLike, encoding: str = "utf-8", n_ctx: int = 1024,
                    n_embd: int = 768, n_head: int = 12, n_layer: int = 12,
                    quiet: bool = False) -> Path:
    """Train a byte-level BPE of ``vocab_size`` ids (``<|endoftext|>`` included) on the files
    that ``paths`` name and write ``encoder.json``, ``vocab.bpe`` and ``hparams.json`` into
    ``out_dir``. Returns ``out_dir``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise UserError(f"--vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    if n_embd % n_head:
        raise UserError(f"--n_embd {n_embd} is not divisible by --n_head {n_head}")
    specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = [f for spec in specs for f in expand_paths(spec)]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=not quiet,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus_texts(files, encoding), trainer=trainer)

    b2u = bytes_to_unicode()
    encoder = {b2u[b]: i for i, b in enumerate(gpt2_byte_order())}
    merges = []
    for a, b in _merges(tokenizer):
        if a + b in encoder:
            # A second way to build an existing token would give two merges one id; dropping
            # it keeps "id == merge rank", which rank-based BPE encoders rely on.
            continue
        encoder[a + b] = len(encoder)
        merges.append(f"{a} {b}")
    encoder[EOT] = len(encoder)
    n_vocab = len(encoder)
    if n_vocab < vocab_size and not quiet:
        print(f"note: the corpus only supports {n_vocab} ids (asked for {vocab_size})",
              file=sys.stderr)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "encoder.json", json.dumps(encoder))
    write_text(out / "vocab.bpe", "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    hparams = {"n_vocab": n_vocab, "n_ctx": n_ctx, "n_embd": n_embd, "n_head": n_head,
               "n_layer": n_layer}
    write_text(out / "hparams.json", json.dumps(hparams, indent=2) + "\n")
    if not quiet:
        print(f"wrote {out}: {n_vocab} ids ({len(merges)} merges) and hparams.json")
    return out
