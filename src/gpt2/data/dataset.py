"""A training dataset: the token chunks of whatever ``--dataset`` names, encoded once and cached.

    chunks = load_dataset("data/", encoder)      # list of 1-D token arrays (memory maps)

A single ``.npz``/``.bin`` is read as it is; anything holding text is encoded once and cached by
content hash under ``$GPT2_CACHE/datasets`` (default ``~/.cache/gpt2/datasets``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from .encode import encode_to_bin, encoder_key
from .sources import PRE_ENCODED, expand_paths
from .tokens import FORMAT_VERSION, index_path, load_bin, load_token_file


def default_cache_dir() -> Path:
    root = os.environ.get("GPT2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2")
    return Path(root) / "datasets"


def _content_key(paths: list[Path], encoder, combine: int, encoding: str) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, encoder_key(encoder), combine,
                                   encoding]).encode())
    for p in paths:
        h.update(p.suffix.lower().encode() + b"\0")  # the suffix decides how a file is read
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0end\0")
    return h.hexdigest()[:40]


def load_dataset(path: str | os.PathLike, encoder, combine: int = 50000,
                 encoding: str = "utf-8", cache_dir: str | os.PathLike | None = None,
                 quiet: bool = False, workers: int | None = None) -> list[np.ndarray]:
    """The chunks of a dataset: a text file, directory, glob, ``.npz`` or ``.bin``.

    A single ``.npz``/``.bin`` is loaded directly (``.bin`` chunks are memory maps). Anything
    with text is encoded once and cached by content hash under ``cache_dir`` (default
    ``$GPT2_CACHE/datasets`` or ``~/.cache/gpt2/datasets``) as a ``.bin``.
    """
    paths = expand_paths(path)
    if len(paths) == 1 and paths[0].suffix.lower() in PRE_ENCODED:
        chunks = load_token_file(paths[0])
    else:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        out = cache / (_content_key(paths, encoder, combine, encoding) + ".bin")
        if out.exists() and index_path(out).exists():
            if not quiet:
                print(f"Using cached encoding {out}")
        else:
            encode_to_bin(paths, out, encoder, combine=combine, encoding=encoding,
                          workers=workers, quiet=quiet)
        chunks = load_bin(out)
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        raise UserError(f"dataset {path} holds no tokens")
    if not quiet:
        print(f"dataset has {sum(len(c) for c in chunks):,} tokens in {len(chunks):,} chunks")
    return chunks


def check_vocab(chunks: list[np.ndarray], n_vocab: int, path: str) -> None:
    """Every token id must be one the model has."""
    top = max((int(c.max()) for c in chunks if len(c)), default=-1)
    if top >= n_vocab:
        raise UserError(f"dataset {path} holds token id {top} but the model has only {n_vocab} "
                        "tokens; was it encoded with another model's encoder?")
