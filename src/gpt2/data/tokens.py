"""Token files and the chunks they hold: ``.bin`` (flat, memory-mapped, with a ``.bin.json``
index) and ``.npz`` (the original ``encode.py``'s layout).

    chunks = load_token_files([Path("shards/a.bin"), Path("shards/b.bin")])   # read in place
    len(chunks), chunks.n_tokens, chunks.lengths      # numpy arrays, not a list of views
    chunks[3]                                         # one chunk: a zero-copy view
    index = read_index(Path("corpus.bin"))            # dtype, counts, encoder fingerprint

``X.bin`` holds every document's ids back to back (uint16, or uint32 above 65,536 ids),
consecutive documents separated by the end-of-text id; ``X.bin.json`` records how the file
was made (n_vocab, the encoder's fingerprint, the sources) and where its chunks are. Version 2
indexes store the chunk table as base64 int64 ``[start, length]`` pairs, so that an
OpenWebText-sized file (818k chunks) opens in milliseconds; version 1's JSON list still reads.

:class:`TokenChunks` is what every consumer of a dataset takes: its state is a few numpy arrays
(file, start, length per chunk) over one memory map per file, however many chunks there are.
"""

from __future__ import annotations

import base64
import json
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import UserError
from ..files.atomic import atomic_write

INDEX_SUFFIX = ".json"            # the index of X.bin is X.bin.json
FORMAT = "gpt2-tokens"
FORMAT_VERSION = 2


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


def index_path(path: Path) -> Path:
    return Path(str(path) + INDEX_SUFFIX)


def encode_chunk_table(chunks: np.ndarray) -> dict:
    """[n, 2] (start, length) -> the index's compact form."""
    data = np.ascontiguousarray(chunks, dtype="<i8").tobytes()
    return {"dtype": "int64", "shape": [len(chunks), 2],
            "base64": base64.b64encode(data).decode("ascii")}


def chunk_table(index: dict) -> np.ndarray:
    """An index's chunks as an int64 [n, 2] array of (start, length)."""
    table = index.get("chunk_table")
    if table is not None:
        data = base64.b64decode(table["base64"])
        return np.frombuffer(data, dtype="<i8").reshape(-1, 2).astype(np.int64)
    return np.asarray(index["chunks"], dtype=np.int64).reshape(-1, 2)  # version 1


class TokenChunks(Sequence):
    """Chunks of one or more token arrays (memory maps or in memory), as offset arrays.

    ``chunks[i]`` is a view of ``arrays[file[i]][start[i]:start[i] + length[i]]``. ``n_vocab`` is
    the vocabulary the files were encoded for (from their indexes; None when unknown) and
    ``fingerprints`` the encoders' fingerprints.
    """

    def __init__(self, arrays: list[np.ndarray], file: np.ndarray, start: np.ndarray,
                 length: np.ndarray, names: list[str] | None = None, n_vocab: int | None = None,
                 fingerprints: frozenset = frozenset(), shards: bool = False):
        self.arrays = arrays
        self.file = np.asarray(file, dtype=np.int32)
        self.start = np.asarray(start, dtype=np.int64)
        self.lengths = np.asarray(length, dtype=np.int64)
        self.names = names or [f"array {i}" for i in range(len(arrays))]
        self.n_vocab = n_vocab
        self.fingerprints = fingerprints
        self.shards = shards  # several .bin files: held-out validation takes whole ones

    @classmethod
    def of(cls, chunks) -> TokenChunks:
        """From a TokenChunks (itself) or a list of 1-D arrays (each its own chunk)."""
        if isinstance(chunks, TokenChunks):
            return chunks
        arrays = [np.asarray(c) for c in chunks]
        n = len(arrays)
        return cls(arrays, np.arange(n), np.zeros(n), [len(a) for a in arrays])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        f, s = int(self.file[i]), int(self.start[i])
        return self.arrays[f][s:s + int(self.lengths[i])]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def window(self, chunk: int, offset: int, length: int) -> np.ndarray:
        f, s = int(self.file[chunk]), int(self.start[chunk]) + offset
        return self.arrays[f][s:s + length]

    def select(self, which) -> TokenChunks:
        """The chunks ``which`` (indices or a boolean mask) picks, sharing the arrays."""
        return TokenChunks(self.arrays, self.file[which], self.start[which], self.lengths[which],
                           self.names, self.n_vocab, self.fingerprints, self.shards)

    def with_lengths(self, start: np.ndarray, length: np.ndarray) -> TokenChunks:
        """The same chunks with new (start, length): e.g. cut for held-out validation."""
        return TokenChunks(self.arrays, self.file, start, length, self.names, self.n_vocab,
                           self.fingerprints, self.shards)

    def max_token(self) -> int:
        """The largest id in the chunks; reads every token (meant for small in-memory data)."""
        return max((int(c.max()) for c in self if len(c)), default=-1)


def concat(parts: list[TokenChunks]) -> TokenChunks:
    """Several TokenChunks as one, in order."""
    arrays, names, file = [], [], []
    for p in parts:
        file.append(p.file + len(arrays))
        arrays += p.arrays
        names += p.names
    vocabs = [p.n_vocab for p in parts]
    return TokenChunks(arrays, np.concatenate(file), np.concatenate([p.start for p in parts]),
                       np.concatenate([p.lengths for p in parts]), names,
                       None if None in vocabs else max(vocabs),
                       frozenset().union(*(p.fingerprints for p in parts)))


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


def load_bin(path: Path) -> TokenChunks:
    """A ``.bin`` file's chunks, memory-mapped: nothing is read until a window is."""
    index = read_index(path)
    dtype = np.dtype(index["dtype"])
    size = path.stat().st_size
    if size != index["n_tokens"] * dtype.itemsize:
        raise UserError(f"{path}: holds {size} bytes but its index says "
                        f"{index['n_tokens']} {dtype} tokens (re-run encode)")
    if size == 0:
        raise UserError(f"{path}: holds no tokens")
    try:
        table = chunk_table(index)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{index_path(path)}: not a valid chunk table ({e})") from None
    if len(table) and (table.min() < 0 or (table[:, 0] + table[:, 1]).max() > index["n_tokens"]):
        raise UserError(f"{index_path(path)}: chunks reach past the end of {path.name}")
    data = np.memmap(path, dtype=dtype, mode="r")
    fingerprint = index.get("encoder_fingerprint")
    return TokenChunks([data], np.zeros(len(table)), table[:, 0], table[:, 1], [str(path)],
                       index.get("n_vocab"), frozenset([fingerprint] if fingerprint else []))


def load_npz(path: Path) -> TokenChunks:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = [npz[k] for k in npz.files]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    for key, c in enumerate(arrays):
        if c.ndim != 1 or c.dtype.kind not in "iu":
            raise UserError(f"{path}: array {key} is not a 1-D integer token array")
    chunks = TokenChunks.of(arrays)
    chunks.names = [f"{path} array {i}" for i in range(len(arrays))]
    return chunks


def load_token_file(path: Path) -> TokenChunks:
    """The chunks of a pre-encoded ``.npz`` or ``.bin`` (+ ``.bin.json``) file."""
    return load_bin(path) if path.suffix.lower() == ".bin" else load_npz(path)


def load_token_files(paths: list[Path]) -> TokenChunks:
    """Several token files as one dataset, each read in place (``.bin`` memory-mapped)."""
    chunks = concat([load_token_file(p) for p in paths])
    chunks.shards = len(paths) > 1 and all(p.suffix.lower() == ".bin" for p in paths)
    return chunks


def write_npz(chunks, out: Path) -> None:
    """``np.savez_compressed(out, *chunks)``, atomically. int32: what the original fed to TF."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
            np.savez_compressed(f, *[np.asarray(c, dtype=np.int32) for c in chunks])

    atomic_write(out, write)
