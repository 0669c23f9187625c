"""A model directory's tokenizer files: which format, load, fingerprint, copy.

    enc = load_encoder("models/124M")          # encoder.json + vocab.bpe (or HF / sentencepiece)
    enc = get_encoder("124M", models_dir="models")       # the original's entry point
    copy_encoder_files("models/124M", "out/my-model")    # under our names, atomically

A directory's tokenizer is one of (checked in this order, see :data:`ENCODER_FILES`):

- ``encoder.json`` + ``vocab.bpe``: OpenAI's layout, and what we write;
- ``vocab.json`` + ``merges.txt``: the same two files under Hugging Face's names;
- ``sp.model``: a sentencepiece model (``pip install 'gpt2[sentencepiece]'``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import UserError
from ..files.atomic import copy_file
from ..files.paths import follow_run_dir, resolve_model_dir
from .bpe import Encoder, check_merges, read_merges, read_vocab_json
from .sentencepiece import SentencePieceEncoder

# Which files make up an encoder, by format, in the order load_encoder looks for them.
ENCODER_FILES: dict[str, tuple[str, ...]] = {
    "bpe": ("encoder.json", "vocab.bpe"),
    "huggingface": ("vocab.json", "merges.txt"),
    "sentencepiece": ("sp.model",),
}


def _directory(model_dir: str | os.PathLike) -> Path:
    """``model_dir``, or the checkpoint a training run's ``counter`` names (as load_model)."""
    return follow_run_dir(Path(model_dir))


def encoder_format(model_dir: str | os.PathLike) -> str:
    """Which format of :data:`ENCODER_FILES` ``model_dir`` holds (checked in that order)."""
    d = _directory(model_dir)
    if not d.is_dir():
        raise UserError(f"{d}: no such directory")
    for fmt, names in ENCODER_FILES.items():
        present = [n for n in names if (d / n).is_file()]
        if len(present) == len(names):
            return fmt
        if present and fmt != "huggingface":  # vocab.json alone is common in HF dirs
            missing = next(n for n in names if n not in present)
            raise UserError(f"{d}: has {present[0]} but not {missing}")
    raise UserError(f"{d}: no tokenizer files (expected encoder.json + vocab.bpe, "
                    f"vocab.json + merges.txt, or sp.model)")


def bpe_files(model_dir: str | os.PathLike) -> tuple[Path, Path] | None:
    """(vocabulary JSON, merges) of a byte-level BPE directory, whatever their names; else None."""
    d = _directory(model_dir)
    for fmt in ("bpe", "huggingface"):
        paths = [d / n for n in ENCODER_FILES[fmt]]
        if all(p.is_file() for p in paths):
            return paths[0], paths[1]
    return None


def encoder_paths(model_dir: str | os.PathLike) -> list[Path]:
    """The encoder files of ``model_dir``, in a fixed order."""
    return [_directory(model_dir) / n for n in ENCODER_FILES[encoder_format(model_dir)]]


def encoder_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the encoder files' bytes: equal fingerprints mean equal tokenizers."""
    h = hashlib.sha256()
    for path in encoder_paths(model_dir):
        data = path.read_bytes()
        # Length-prefixed so that bytes cannot move from one file to the next unnoticed.
        h.update(f"{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def load_encoder(model_dir: str | os.PathLike) -> Encoder | SentencePieceEncoder:
    """The tokenizer stored in ``model_dir`` (see :data:`ENCODER_FILES`)."""
    fmt = encoder_format(model_dir)
    paths = encoder_paths(model_dir)
    if fmt == "sentencepiece":
        enc = SentencePieceEncoder(paths[0])
    else:
        vocab, merges = read_vocab_json(paths[0]), read_merges(paths[1])
        check_merges(vocab, merges, paths[1], paths[0])
        enc = Encoder(vocab, merges, source=str(paths[0]))
    enc.fingerprint = encoder_fingerprint(model_dir)
    return enc


def get_encoder(model_name: str = "124M", models_dir: str | os.PathLike = "models"
                ) -> Encoder | SentencePieceEncoder:
    """The original's entry point: the encoder of ``models_dir/model_name`` (117M = 124M, ...)."""
    return load_encoder(resolve_model_dir(model_name, models_dir))


def copy_encoder_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[Path]:
    """Copy ``src_dir``'s encoder into ``dst_dir`` under our names (encoder.json + vocab.bpe, or
    sp.model), each written atomically. When copying sp.model, BPE files already in ``dst_dir``
    are removed, since load_encoder would pick them first. Returns the written paths."""
    src, dst = _directory(src_dir), Path(dst_dir)
    fmt = encoder_format(src)
    dst_format = "sentencepiece" if fmt == "sentencepiece" else "bpe"
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for src_name, dst_name in zip(ENCODER_FILES[fmt], ENCODER_FILES[dst_format]):
        target = dst / dst_name
        if target.exists() and target.samefile(src / src_name):
            written.append(target)
            continue
        written.append(copy_file(src / src_name, target))
    if dst_format == "sentencepiece":  # stale BPE files would win over sp.model in load_encoder
        for name in ENCODER_FILES["bpe"] + ENCODER_FILES["huggingface"]:
            (dst / name).unlink(missing_ok=True)
    return written
