"""Writing token files: one ``.bin``, or a directory of shards, each with its own index.

    index = encode_to_bin(expand_paths("data/"), "corpus.bin", encoder, combine=50000)
    encode_corpus("data/", "corpus.npz", enc)                   # what encode.py does
    encode_corpus("pile/", "shards/", enc, shard_tokens=10**8)  # ~1e8-token shards
    encode_corpus("pile/", "shards/", enc, num_shards=64, shard_index=7)  # part 7 of 64

A ``.bin`` holds every document's ids, consecutive documents separated by the end-of-text id,
and its index lists the chunks (``combine``: documents are gathered into one chunk until it
holds at least ``combine`` characters, counting the 13 characters of each ``<|endoftext|>``
between them, as the original ``load_dataset`` did; 0 = one chunk per document). A shard ends
only where a document does. Parts (``num_shards``/``shard_index``) are disjoint slices of the
input in order (:func:`gpt2.data.sources.split_into_parts`); part I writes
``shard-<I>-<J>.bin``, so all parts' shards in name order are the whole input in order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..files.atomic import (WriteError, is_temp_name, publish, temp_name, write_error,
                         write_text)
from .encode import Task, default_workers, encoded, encoder_key
from .sources import EOT, Part, ReadOptions, Source, expand_paths, split_into_parts
from .tokens import (FORMAT, FORMAT_VERSION, encode_chunk_table, index_path, load_bin,
                     token_dtype, write_npz)


class _ChunkWriter:
    """Appends documents' ids to an open token file and records the chunks as it goes."""

    def __init__(self, f: BinaryIO, dtype: np.dtype, eot: int, combine: int):
        self.f, self.dtype, self.combine = f, dtype, combine
        self.eot = np.array([eot], dtype=dtype)
        self.chunks: list[tuple[int, int]] = []
        self.n_tokens = self.n_docs = 0
        self.chunk_start: int | None = None
        self.chunk_chars = 0
        self.need_sep = False

    def write(self, arr: np.ndarray) -> None:
        # (not arr.tofile: a full disk there is "N requested and M written", no errno)
        self.f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        self.n_tokens += len(arr)

    def close_chunk(self) -> None:
        if self.chunk_start is not None:
            self.chunks.append((self.chunk_start, self.n_tokens - self.chunk_start))
        self.chunk_start, self.chunk_chars = None, 0

    def start_document(self) -> None:
        if self.need_sep:
            self.write(self.eot)
        if self.chunk_start is None:
            self.chunk_start = self.n_tokens
        else:
            self.chunk_chars += len(EOT)  # the original counted the separator's characters
        self.n_docs += 1

    def end_document(self, chars: int) -> None:
        self.need_sep = True
        self.chunk_chars += chars
        if self.chunk_chars >= self.combine:
            self.close_chunk()

    def add_chunk(self, arr: np.ndarray, n_vocab: int, source: Path) -> None:
        """A pre-encoded chunk, kept a chunk of its own."""
        if len(arr) == 0:
            return
        top = int(arr.max())
        if top >= n_vocab:
            raise UserError(f"{source}: holds token id {top}, beyond this encoder's {n_vocab} ids")
        self.close_chunk()
        self.start_document()
        self.n_docs += int(np.count_nonzero(arr == self.eot[0]))
        self.write(np.asarray(arr, dtype=self.dtype))
        self.need_sep = True
        self.close_chunk()


class _Outputs:
    """The token file(s) being written: one ``.bin``, or shards rolled over at document ends.

    Each file is written under a temporary name and published (renamed, then its index
    written) when it is complete; an interrupted run leaves no partial file behind.
    """

    def __init__(self, out: Path, encoder, combine: int, meta: dict,
                 shard_tokens: int | None = None, prefix: str | None = None):
        self.out, self.encoder, self.combine, self.meta = out, encoder, combine, meta
        self.shard_tokens, self.prefix = shard_tokens, prefix
        self.dtype = token_dtype(encoder.n_vocab)
        self.indexes: list[dict] = []
        self.f: BinaryIO | None = None
        self.seen = self.encoded = 0  # input bytes handed to the writer, and their tokens

    def needed(self, total: int) -> int:
        """Bytes all the output takes, about: the tokens of the input encoded so far, scaled
        up to the whole input (before any: ~4 bytes of text per token, GPT-2's average)."""
        if not self.seen:
            return total * self.dtype.itemsize // 4
        return self.encoded * self.dtype.itemsize * total // self.seen

    def path(self, j: int) -> Path:
        return self.out if self.prefix is None else self.out / f"{self.prefix}-{j:05d}.bin"

    def open(self) -> None:
        path = self.path(len(self.indexes))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(path)
        self.f = open(self.tmp, "wb")
        self.w = _ChunkWriter(self.f, self.dtype, int(self.encoder.eot_token), self.combine)

    def document_ended(self) -> None:
        if self.shard_tokens and self.w.n_tokens >= self.shard_tokens:
            self.finish()
            self.open()

    def finish(self) -> None:
        """Close the current file: rename it into place and write its index after it."""
        w, path = self.w, self.path(len(self.indexes))
        w.close_chunk()
        self.f.close()
        self.f = None
        if w.n_tokens == 0:  # nothing after the last roll-over (or no text at all)
            self.tmp.unlink()
            return
        index = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": self.dtype.name,
                 "n_tokens": w.n_tokens, "n_documents": w.n_docs, "n_chunks": len(w.chunks),
                 "eot_token": int(self.encoder.eot_token), "n_vocab": int(self.encoder.n_vocab),
                 "combine": self.combine, **self.meta,
                 "chunk_table": encode_chunk_table(np.array(w.chunks, dtype=np.int64))}
        index_path(path).unlink(missing_ok=True)  # never a new .bin beside an old index
        publish(self.tmp, path)
        try:
            write_text(index_path(path), json.dumps(index, indent=1))
        except BaseException:
            path.unlink(missing_ok=True)  # a .bin without its index is not a token file
            raise
        self.indexes.append(index)

    def abort(self) -> None:
        if self.f is not None:
            try:
                self.f.close()  # flushing may fail too (the disk is full): the file goes anyway
            except OSError:
                pass
            self.f = None
            self.tmp.unlink(missing_ok=True)


def _write_all(outputs: _Outputs, parts: list[Part], encoder, opts: ReadOptions, workers: int,
               backend: str, quiet: bool, label: str, total: int) -> None:
    def warn_empty(path: Path) -> None:
        if not quiet:
            tqdm.write(f"warning: {path} holds no text; skipped", file=sys.stderr)

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"encoding {label}", disable=quiet,
              smoothing=0.1) as bar:
        for task, arrays in encoded(parts, encoder, opts, workers, backend, warn_empty,
                                    outputs.dtype):
            outputs.seen += task.nbytes
            outputs.encoded += sum(len(a) for a in arrays)
            if task.chunks is not None:
                for arr in arrays:
                    outputs.w.add_chunk(arr, encoder.n_vocab, task.source)
                    outputs.document_ended()
            else:
                _add_pieces(outputs, task, arrays)
            bar.update(task.nbytes)


def _add_pieces(outputs: _Outputs, task: Task, arrays: list[np.ndarray]) -> None:
    for starts, chars, arr in zip(task.doc_start, task.doc_chars, arrays):
        if starts:
            outputs.w.start_document()
        outputs.w.write(arr)
        if chars is not None:  # the document ends here
            outputs.w.end_document(chars)
            outputs.document_ended()


def encode_parts(parts: list[Part], out: Path, encoder, combine: int = 50000,
                 opts: ReadOptions = ReadOptions(), workers: int | None = None,
                 backend: str = "process", fingerprint: str | None = None, quiet: bool = False,
                 extra: dict | None = None, label: str | None = None,
                 shard_tokens: int | None = None, prefix: str | None = None) -> list[dict]:
    """Encode ``parts`` into ``out`` (a ``.bin``; with ``prefix``, shards in the directory
    ``out``); returns the index of each file written."""
    if encoder.eot_token is None:
        raise UserError("this tokenizer has no end-of-text token to separate documents with")
    sources = sorted({p.path for p in parts})
    meta = {"encoding": opts.encoding, "text_field": opts.text_field,
            "split_eot": opts.split_eot,
            "encoder_fingerprint": fingerprint or encoder_key(encoder), **(extra or {}),
            "sources": [Source.of(p).record() for p in sources]}
    outputs = _Outputs(Path(out), encoder, combine, meta, shard_tokens, prefix)
    outputs.open()
    total = sum(s.stat().st_size for s in sources)
    try:
        _write_all(outputs, parts, encoder, opts, workers or default_workers(), backend, quiet,
                   label or Path(out).name, total)
        outputs.finish()
    except BaseException as e:
        outputs.abort()
        error = write_error(e, outputs.path(len(outputs.indexes)), outputs.needed(total))
        if error is not None:
            raise error from None
        raise
    if not outputs.indexes:
        what = str(sources[0]) if len(sources) == 1 else \
            f"{len(sources)} input files ({sources[0]}, ...)" if sources else str(label or out)
        raise UserError(f"{what}: no text to encode (all input files are empty)")
    return outputs.indexes


def encode_to_bin(inputs: str | os.PathLike | list[Path], out: str | os.PathLike, encoder,
                  combine: int = 50000, encoding: str = "utf-8", workers: int | None = None,
                  backend: str = "process", fingerprint: str | None = None,
                  quiet: bool = False, extra: dict | None = None, label: str | None = None,
                  text_field: str = "text", split_eot: bool = True) -> dict:
    """Stream ``inputs`` into the flat token file ``out`` (+ ``out.json``); returns the index.

    Written atomically: a temp file in the same directory, renamed when complete.
    """
    paths = inputs if isinstance(inputs, list) else expand_paths(inputs)
    label = label or (f"{len(paths)} input files" if isinstance(inputs, list) else None)
    return encode_parts([Part(p) for p in paths], Path(out), encoder, combine,
                        ReadOptions(encoding, text_field, split_eot), workers, backend,
                        fingerprint, quiet, extra, label)[0]


def is_up_to_date(out: Path, paths: list[Path], fingerprint: str, combine: int,
                  opts: ReadOptions) -> bool:
    """Whether ``out`` was encoded from exactly these files (size, mtime) with this encoder."""
    try:
        index = json.loads(index_path(out).read_text())
        return (index.get("format") == FORMAT
                and index.get("version") == FORMAT_VERSION
                and index.get("encoder_fingerprint") == fingerprint
                and index.get("combine") == combine and index.get("encoding") == opts.encoding
                and index.get("text_field") == opts.text_field
                and index.get("split_eot") == opts.split_eot
                and index.get("sources") == [Source.of(p).record() for p in paths]
                and out.stat().st_size == index["n_tokens"] * np.dtype(index["dtype"]).itemsize)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# --- encode.py ---------------------------------------------------------------------------------

def _inputs(in_text: str, out: Path) -> list[Path]:
    """The input files, without the output itself (an output may sit inside the input)."""
    mine = {out.resolve(), index_path(out.resolve())}
    paths = [p for p in expand_paths(in_text) if p.resolve() not in mine
             and not (out.is_dir() and out.resolve() in p.resolve().parents
                      and p.name.startswith("shard-"))
             and not is_temp_name(p.name)]
    if not paths:
        raise UserError(f"{in_text} holds no input files besides the output {out}")
    return paths


def _remove_old_shards(outdir: Path, prefix: str, keep: int) -> None:
    """Shards of an earlier run of this part beyond the ones just written."""
    for p in outdir.glob(f"{prefix}-*.bin"):
        try:
            j = int(p.stem.rsplit("-", 1)[1])
        except ValueError:
            continue
        if j >= keep:
            p.unlink(missing_ok=True)
            index_path(p).unlink(missing_ok=True)


def encode_corpus(in_text: str, out: str | os.PathLike, encoder, combine: int = 50000,
                  encoding: str = "utf-8", workers: int | None = None, force: bool = False,
                  quiet: bool = False, text_field: str = "text", split_eot: bool = True,
                  shard_tokens: int | None = None, num_shards: int = 1, shard_index: int = 0,
                  encoder_dir: str | os.PathLike | None = None) -> list[dict]:
    """What encode.py does: ``in_text`` into ``out`` with ``encoder`` (a model directory's,
    from ``gpt2.tokenizer.load_encoder(encoder_dir)``; ``encoder_dir`` is recorded in the
    index).

    ``out`` ending in ``.npz`` or ``.bin`` is one file; a directory (an existing one, or a path
    ending in ``/``) gets shards. Returns the indexes written (none when up to date).
    """
    shards = str(out).endswith(("/", os.sep)) or Path(out).is_dir()
    out = Path(out)
    _check_corpus_args(out, shards, combine, workers, shard_tokens, num_shards, shard_index)
    opts = ReadOptions(encoding, text_field, split_eot)
    paths = _inputs(in_text, out)
    fingerprint = encoder_key(encoder)
    say = (lambda *a: None) if quiet else print
    if not shards and out.suffix == ".bin" and not force and is_up_to_date(
            out, paths, fingerprint, combine, opts):
        say(f"{out} is up to date (same sources and encoder); nothing to do")
        return []
    parts = split_into_parts(paths, num_shards)[shard_index]
    if not parts:
        say(f"part {shard_index} of {num_shards} holds no input (more parts than data)")
        return []
    say(f"Reading {len(parts)} file{'s' * (len(parts) != 1)}"
        + (f" (part {shard_index} of {num_shards})" if num_shards > 1 else ""))
    extra = {"encoder_dir": str(Path(encoder_dir).resolve())} if encoder_dir is not None else {}
    if num_shards > 1:
        extra["part"] = {"index": shard_index, "of": num_shards}
    if shards:
        out.mkdir(parents=True, exist_ok=True)
        prefix = f"shard-{shard_index:05d}"
        indexes = encode_parts(parts, out, encoder, combine, opts, workers, "process",
                               fingerprint, quiet, extra, f"{out}/{prefix}", shard_tokens, prefix)
        _remove_old_shards(out, prefix, len(indexes))
    else:
        indexes = [_encode_one_file(parts, out, encoder, combine, opts, workers, fingerprint,
                                    quiet, extra, say)]
    n_tokens = sum(i["n_tokens"] for i in indexes)
    say(f"{out}: {n_tokens:,} tokens, {sum(i['n_documents'] for i in indexes):,} documents, "
        f"{sum(i['n_chunks'] for i in indexes):,} chunks"
        + (f" in {len(indexes)} shards" if shards else ""))
    return indexes


def _check_corpus_args(out: Path, shards: bool, combine: int, workers: int | None,
                       shard_tokens: int | None, num_shards: int, shard_index: int) -> None:
    if not shards and out.suffix not in (".npz", ".bin"):
        raise UserError(f"output {out} must end in .npz or .bin, or be a directory (end it "
                        "with / for shards)")
    for flag, value, low in (("combine", combine, 0), ("workers", workers, 1),
                             ("shard_tokens", shard_tokens, 1), ("num_shards", num_shards, 1)):
        if value is not None and value < low:
            raise UserError(f"--{flag} must be >= {low}, got {value}")
    if not 0 <= shard_index < num_shards:
        raise UserError(f"--shard_index must be in 0..{num_shards - 1}, got {shard_index}")
    if not shards and (shard_tokens or num_shards > 1):
        raise UserError(f"--shard_tokens and --num_shards write shards: OUT ({out}) must be a "
                        "directory (end it with /)")


def _encode_one_file(parts: list[Part], out: Path, encoder, combine: int, opts: ReadOptions,
                     workers: int | None, fingerprint: str, quiet: bool, extra: dict, say
                     ) -> dict:
    """One ``.bin``, or an ``.npz`` made from a temporary one (one pipeline for both)."""
    target = out if out.suffix == ".bin" else temp_name(out)
    try:
        index = encode_parts(parts, target, encoder, combine, opts, workers, "process",
                             fingerprint, quiet, extra, out.name)[0]
        if out.suffix == ".npz":
            say(f"Writing {out}")
            write_npz(load_bin(target), out)
    except WriteError as e:  # (the .npz's temporary .bin is not what the user asked for)
        raise write_error(e, out) from None
    finally:
        if out.suffix == ".npz":
            for p in (target, index_path(target)):
                p.unlink(missing_ok=True)
    return index
