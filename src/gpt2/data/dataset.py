"""A training dataset: the token chunks of whatever ``--dataset`` names, encoded once and cached.

    chunks = load_dataset("data/", encoder)      # TokenChunks: offset arrays over memory maps
    chunks = load_dataset("shards/*.bin", encoder)   # shards read in place, nothing copied

Token files are read as they are; anything holding text is encoded once and cached by content
hash under ``$GPT2_CACHE/datasets`` (default ``~/.cache/gpt2/datasets``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import UserError
from .encode import encoder_key
from .sources import PRE_ENCODED, ReadOptions, expand_paths
from .tokens import FORMAT_VERSION, TokenChunks, index_path, load_bin, load_token_files
from .write import encode_to_bin


def default_cache_dir() -> Path:
    root = os.environ.get("GPT2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2")
    return Path(root) / "datasets"


def _content_key(paths: list[Path], encoder, combine: int, opts: ReadOptions) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, encoder_key(encoder), combine, opts.encoding,
                                   opts.text_field, opts.split_eot]).encode())
    for p in paths:
        h.update("".join(p.suffixes[-2:]).lower().encode() + b"\0")  # how a file is read
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0end\0")
    return h.hexdigest()[:40]


def load_dataset(path: str | os.PathLike, encoder, combine: int = 50000,
                 encoding: str = "utf-8", cache_dir: str | os.PathLike | None = None,
                 quiet: bool = False, workers: int | None = None, text_field: str = "text",
                 split_eot: bool = True) -> TokenChunks:
    """The chunks of a dataset: text files, a directory, a glob, ``.npz`` or ``.bin`` shards.

    Token files (``.npz``, ``.bin`` shards) are read in place, ``.bin`` memory-mapped: nothing
    is copied and nothing is re-encoded. Anything holding text is encoded once and cached by
    content hash under ``cache_dir`` (default ``$GPT2_CACHE/datasets`` or
    ``~/.cache/gpt2/datasets``) as a ``.bin``.
    """
    paths = expand_paths(path)
    if all(p.suffix.lower() in PRE_ENCODED for p in paths):
        chunks = load_token_files(paths)
    else:
        opts = ReadOptions(encoding, text_field, split_eot)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        out = cache / (_content_key(paths, encoder, combine, opts) + ".bin")
        if out.exists() and index_path(out).exists():
            if not quiet:
                print(f"Using cached encoding {out}")
        else:
            encode_to_bin(paths, out, encoder, combine=combine, encoding=encoding,
                          workers=workers, quiet=quiet, text_field=text_field,
                          split_eot=split_eot)
        chunks = load_bin(out)
    chunks = chunks.select(chunks.lengths > 0)
    if not len(chunks):
        raise UserError(f"dataset {path} holds no tokens")
    if not quiet:
        files = f" in {len(chunks.arrays):,} files" if len(chunks.arrays) > 1 else ""
        print(f"dataset has {chunks.n_tokens:,} tokens in {len(chunks):,} chunks{files}")
    return chunks


def check_vocab(chunks, n_vocab: int, path: str) -> None:
    """Every token id must be one the model has: from the files' indexes when they say (no
    token is read), else from the tokens (in-memory data such as .npz)."""
    chunks = TokenChunks.of(chunks)
    if chunks.n_vocab is not None:
        if chunks.n_vocab > n_vocab:
            raise UserError(f"dataset {path} was encoded for a vocabulary of {chunks.n_vocab} ids "
                            f"(its index says so) but the model has only {n_vocab}; was it "
                            "encoded with another model's encoder?")
        return
    top = chunks.max_token()
    if top >= n_vocab:
        raise UserError(f"dataset {path} holds token id {top} but the model has only {n_vocab} "
                        "tokens; was it encoded with another model's encoder?")
