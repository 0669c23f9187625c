"""Train a tokenizer on your own corpus (``gpt2 tokenizer train``): GPT-2's byte-level BPE, or
a sentencepiece model (unigram or BPE), either into a directory every command can train from.

    python -m gpt2 tokenizer train corpus/ --vocab_size 8192 --out models/my-tok
    python -m gpt2 tokenizer train 'pile/*.jsonl.zst' --type sentencepiece --vocab_size 32000 \
        --out models/my-sp
    python -m gpt2 train --dataset corpus/ --model_dir models/my-tok --init fresh

Both read every input kind encode.py reads (compressed text, JSON lines, parquet, ...) as a
stream; a literal ``<|endoftext|>`` separates documents, as in encoding.

**bpe** trains with Hugging Face ``tokenizers`` using GPT-2's pre-tokenizer (ByteLevel, no
prefix space) and writes OpenAI's files, so every GPT-2 tool reads them:

- ``encoder.json``: ids equal merge priority, as in GPT-2: the 256 byte tokens first in GPT-2's
  byte order, then one token per merge in rank order, then ``<|endoftext|>`` last;
- ``vocab.bpe``: ``#version: 0.2`` then the merges in rank order;
- ``hparams.json``: ``n_vocab`` (including ``<|endoftext|>``) and a default 124M-shaped
  architecture (override with ``--n_ctx --n_embd --n_head --n_layer``).

**sentencepiece** trains Google's sentencepiece (``pip install 'gpt2[sentencepiece]'``) on lines
sampled from the stream (``input_sentence_size`` of them at most, reservoir-sampled: the corpus
is never held in memory), with byte fallback on by default (no unknown tokens) and
``<|endoftext|>`` as a user-defined symbol (the document separator), and writes ``sp.model`` and
``hparams.json``.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from ..data.encode import PIECE_CHARS, pieces
from ..data.sources import PRE_ENCODED, ReadOptions, documents, expand_paths
from ..errors import UserError
from ..files.atomic import write_bytes, write_text
from .bpe import EOT, bytes_to_unicode, gpt2_byte_order


def corpus_texts(paths: list[Path], opts: ReadOptions) -> Iterator[str]:
    """Every document of the corpus, in ~256K-character pieces cut where the pre-tokenizer
    splits anyway (so a huge file never has to be one string)."""
    for path in paths:
        if path.suffix.lower() in PRE_ENCODED:
            raise UserError(f"{path}: tokenizers train on text, not pre-encoded tokens")
        for doc in documents(path, opts):
            for text, _, _ in pieces(doc, PIECE_CHARS, splittable=True):
                if text:
                    yield text


def _merges(tokenizer) -> list[tuple[str, str]]:
    model = json.loads(tokenizer.to_str())["model"]
    # tokenizers >= 0.20 stores [a, b]; older versions "a b".
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def _files(paths) -> list[Path]:
    specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return [f for spec in specs for f in expand_paths(spec)]


def _write_hparams(out: Path, n_vocab: int, n_ctx: int, n_embd: int, n_head: int,
                   n_layer: int) -> None:
    hparams = {"n_vocab": n_vocab, "n_ctx": n_ctx, "n_embd": n_embd, "n_head": n_head,
               "n_layer": n_layer}
    write_text(out / "hparams.json", json.dumps(hparams, indent=2) + "\n")


def train_tokenizer(paths: str | os.PathLike | Iterable[str | os.PathLike], vocab_size: int,
                    out_dir: str | os.PathLike, encoding: str = "utf-8", n_ctx: int = 1024,
                    n_embd: int = 768, n_head: int = 12, n_layer: int = 12,
                    quiet: bool = False, kind: str = "bpe", text_field: str = "text",
                    **sentencepiece_options) -> Path:
    """Train a tokenizer of ``vocab_size`` ids (``<|endoftext|>`` included) on the files that
    ``paths`` name and write it with ``hparams.json`` into ``out_dir``. Returns ``out_dir``.

    ``kind``: ``bpe`` (GPT-2's byte-level BPE) or ``sentencepiece`` (options:
    :func:`train_sentencepiece`'s).
    """
    if n_embd % n_head:
        raise UserError(f"--n_embd {n_embd} is not divisible by --n_head {n_head}")
    shape = dict(n_ctx=n_ctx, n_embd=n_embd, n_head=n_head, n_layer=n_layer)
    opts = ReadOptions(encoding, text_field)
    if kind == "sentencepiece":
        return train_sentencepiece(_files(paths), vocab_size, Path(out_dir), opts, shape, quiet,
                                   **sentencepiece_options)
    if kind != "bpe":
        raise UserError(f"--type must be bpe or sentencepiece, got {kind!r}")
    return _train_bpe(_files(paths), vocab_size, Path(out_dir), opts, shape, quiet)


def _train_bpe(files: list[Path], vocab_size: int, out: Path, opts: ReadOptions, shape: dict,
               quiet: bool) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise UserError(f"--vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=not quiet,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus_texts(files, opts), trainer=trainer)

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

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "encoder.json", json.dumps(encoder))
    write_text(out / "vocab.bpe", "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    (out / "sp.model").unlink(missing_ok=True)  # one tokenizer per directory
    _write_hparams(out, n_vocab, **shape)
    if not quiet:
        print(f"wrote {out}: {n_vocab} ids ({len(merges)} merges) and hparams.json")
    return out


def _lines(files: list[Path], opts: ReadOptions, quiet: bool) -> Iterator[str]:
    """The corpus as sentencepiece reads it: non-empty lines, with a progress bar."""
    with tqdm(unit=" lines", unit_scale=True, desc="reading", disable=quiet) as bar:
        for text in corpus_texts(files, opts):
            for line in text.split("\n"):
                if line.strip():
                    bar.update()
                    yield line


def train_sentencepiece(files: list[Path], vocab_size: int, out: Path, opts: ReadOptions,
                        shape: dict, quiet: bool = False, model_type: str = "unigram",
                        byte_fallback: bool = True, input_sentence_size: int = 1_000_000,
                        character_coverage: float = 0.9995) -> Path:
    """A sentencepiece model of ``vocab_size`` pieces (``<|endoftext|>`` one of them):
    ``sp.model`` + ``hparams.json`` in ``out``."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise UserError("--type sentencepiece needs the sentencepiece package: pip install "
                        "'gpt2[sentencepiece]'") from None
    if model_type not in ("unigram", "bpe"):
        raise UserError(f"--model_type must be unigram or bpe, got {model_type!r}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(files, opts, quiet), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
            user_defined_symbols=[EOT], input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, character_coverage=character_coverage,
            max_sentence_length=1 << 16, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1,
            num_threads=os.cpu_count() or 1, minloglevel=2 if quiet else 1)
    except RuntimeError as e:  # e.g. a vocabulary larger than the corpus supports
        first = (str(e).strip().splitlines() or ["failed"])[-1]
        raise UserError(f"sentencepiece training failed: {first}") from None
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "sp.model", model.getvalue())
    for name in ("encoder.json", "vocab.bpe", "vocab.json", "merges.txt"):
        (out / name).unlink(missing_ok=True)  # they would be read before sp.model
    n_vocab = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    _write_hparams(out, n_vocab, **shape)
    if not quiet:
        print(f"wrote {out}: sp.model ({model_type}, {n_vocab} pieces) and hparams.json")
    return out
