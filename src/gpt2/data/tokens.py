"""Token files: ``.bin`` (flat, memory-mapped, with a ``.bin.json`` index) and ``.npz``.

    chunks = load_token_file(Path("corpus.bin"))    # zero-copy memory maps, one per chunk
    index = read_index(Path("corpus.bin"))          # dtype, counts, chunks, encoder fingerprint

``X.bin`` holds every document's ids back to back (uint16, or uint32 above 65,536 ids),
consecutive documents separated by the end-of-text id; ``X.bin.json`` lists the chunks as
``[start, length]`` and records how the file was made. ``.npz`` is the original ``encode.py``'s
layout: one 1-D integer array per chunk.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io.atomic import atomic_write

INDEX_SUFFIX = ".json"            # the index of X.bin is X.bin.json
FORMAT = "gpt2-tokens"
FORMAT_VERSION = 1


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


def index_path(path: Path) -> Path:
    return Path(str(path) + INDEX_SUFFIX)


def load_token_file(path: Path) -> list[np.ndarray]:
    """The chunks of a pre-encoded ``.npz`` or ``.bin`` (+ ``.bin.json``) file."""
    if path.suffix.lower() == ".bin":
        return load_bin(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            chunks = [npz[k] for k in npz.files]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    for key, c in enumerate(chunks):
        if c.ndim != 1 or c.dtype.kind not in "iu":
            raise UserError(f"{path}: array {key} is not a 1-D integer token array")
    return chunks


def read_index(path: Path) -> dict:
    """The ``.bin.json`` index beside a ``.bin`` token file."""
    index_file = index_path(path)
    try:
        index = json.loads(index_file.read_text())
        if index.get("format") != FORMAT:
            raise ValueError("not a gpt2-tokens index")
        np.dtype(index["dtype"])
        return index
    except FileNotFoundError:
        raise UserError(f"{path}: its index {index_file.name} is missing (re-run encode)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{index_file}: not a valid token index ({e})") from None


def load_bin(path: Path) -> list[np.ndarray]:
    index = read_index(path)
    dtype = np.dtype(index["dtype"])
    size = path.stat().st_size
    if size != index["n_tokens"] * dtype.itemsize:
        raise UserError(f"{path}: holds {size} bytes but its index says "
                        f"{index['n_tokens']} {dtype} tokens (re-run encode)")
    if size == 0:
        raise UserError(f"{path}: holds no tokens")
    data = np.memmap(path, dtype=dtype, mode="r")
    return [data[start:start + length] for start, length in index["chunks"]]


def write_npz(chunks: list[np.ndarray], out: Path) -> None:
    """``np.savez_compressed(out, *chunks)``, atomically. int32: what the original fed to TF."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
            np.savez_compressed(f, *[np.asarray(c, dtype=np.int32) for c in chunks])

    atomic_write(out, write)
