"""Encoding: text files -> one flat ``.bin`` token file, streamed, in order, on every core.

    index = encode_to_bin(expand_paths("data/"), "corpus.bin", encoder, combine=50000)
    encode_corpus("data/", "corpus.npz", "models/124M")     # what encode.py does

Files are read in blocks, cut into pieces where GPT-2's pre-tokenizer would split anyway (so
the ids equal encoding each document whole), encoded by a pool of workers in input order, and
written straight to the ``.bin`` (:mod:`gpt2.data.tokens`). Memory stays flat however large
the corpus. Documents are separated by the id of ``<|endoftext|>``, never by its text.

``combine`` keeps the original meaning: documents are gathered into one chunk until it holds at
least ``combine`` characters (0 = one chunk per document). A training window never crosses a
chunk boundary.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import hashlib
import json
import multiprocessing
import os
import re
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..io.atomic import atomic_path, temp_name, write_text
from .sources import PRE_ENCODED, Source, documents, expand_paths
from .tokens import (FORMAT, FORMAT_VERSION, index_path, load_bin, load_token_file, token_dtype,
                     write_npz)

PIECE_CHARS = 1 << 18             # pieces of ~256K characters ...
TASK_CHARS = 1 << 19              # ... batched into ~512K-character worker tasks


# Cut between a non-space character and the whitespace after it. GPT-2's pre-tokenizer never
# puts both in one pre-token (whitespace runs attach to the *following* word), and nothing it
# matches looks behind, so encoding the two sides separately gives the same ids as the whole.
_CUT = re.compile(r"\S(?=[ \t\n])")


def _cut_near(text: str, target: int, searched: int = 0) -> int:
    """A safe cut position near ``target``: the last one at most 64K characters before it, else
    the first one after it (searching from ``searched``, what earlier calls already saw); -1 if
    there is none."""
    for window in (256, 8192, 65536):  # text nearly always has a cut within a line or two
        last = None
        for last in _CUT.finditer(text, max(0, target - window), target + 1):
            pass
        if last is not None:
            return last.start() + 1
    m = _CUT.search(text, max(target, searched - 1))
    return m.start() + 1 if m else -1


def pieces(blocks: Iterable[tuple[str, int]], piece_chars: int, splittable: bool
            ) -> Iterator[tuple[str, int, bool]]:
    """Re-cut one document's blocks into (text, bytes read, is last) pieces of about
    ``piece_chars``, at safe positions only. An empty document gives one empty piece."""

    def cut(blocks):
        buf, nbytes, searched = "", 0, 0
        for text, n in blocks:
            buf += text
            nbytes += n
            while splittable and len(buf) > piece_chars:
                at = _cut_near(buf, piece_chars, searched)
                if at <= 0:
                    searched = len(buf)  # no cut yet: read on, not searching this part again
                    break
                yield buf[:at], nbytes
                buf, nbytes, searched = buf[at:], 0, 0
        yield buf, nbytes

    prev, spare = None, 0  # look one piece ahead to know which is last
    for text, n in cut(blocks):
        if not text:
            spare += n
            continue
        if prev is not None:
            yield prev[0], prev[1], False
        prev, spare = (text, n + spare), 0
    if prev is None:
        yield "", spare, True
    else:
        yield prev[0], prev[1] + spare, True


_PROBE = ("Hello world. It's 2019, and GPT-2's pieces:\n\tindented line  with  spaces,\n\n"
          "Ünïcödé 漢字 テキスト  12345 ,,, --- 'quoted'\n  leading   \t tab\nend")


def splits_cleanly(encoder) -> bool:
    """Whether cutting text at :data:`_CUT` positions leaves this encoder's ids unchanged.

    True for GPT-2's pre-tokenizer (and any byte-level BPE using it); False e.g. for
    sentencepiece models, which add a prefix space to each call. Then documents are encoded whole.
    """
    cuts = [0] + [m.start() + 1 for m in _CUT.finditer(_PROBE)] + [len(_PROBE)]
    pieces = [_PROBE[a:b] for a, b in zip(cuts, cuts[1:])]
    return [t for p in pieces for t in encoder.encode_ordinary(p)] == \
        list(encoder.encode_ordinary(_PROBE))


@dataclass
class _Task:
    """Consecutive pieces for one worker, or pre-encoded chunks passed through."""
    texts: list[str] = field(default_factory=list)
    doc_start: list[bool] = field(default_factory=list)
    doc_chars: list[int | None] = field(default_factory=list)  # set on a document's last piece
    nbytes: int = 0
    chunks: list[np.ndarray] | None = None
    source: Path | None = None


def _tasks(paths: list[Path], encoding: str, splittable: bool, on_empty: Callable[[Path], None]
           ) -> Iterator[_Task]:
    task, size = _Task(), 0
    for path in paths:
        if path.suffix.lower() in PRE_ENCODED:
            if task.texts or task.nbytes:
                yield task
                task, size = _Task(), 0
            yield _Task(chunks=load_token_file(path), nbytes=path.stat().st_size, source=path)
            continue
        had_text = False
        for doc in documents(path, encoding):
            chars = 0
            for text, nbytes, last in pieces(doc, PIECE_CHARS, splittable):
                task.nbytes += nbytes
                if not text:
                    continue
                task.texts.append(text)
                task.doc_start.append(chars == 0)
                chars += len(text)
                task.doc_chars.append(chars if last else None)
                had_text = True
                size += len(text)
                if size >= TASK_CHARS:
                    yield task
                    task, size = _Task(), 0
        if not had_text:
            on_empty(path)
    if task.texts or task.nbytes:
        yield task


_WORKER: tuple | None = None


def _init_worker(encoder, dtype) -> None:
    global _WORKER
    _WORKER = (encoder, dtype)


def _encode_texts(texts: list[str], encoder=None, dtype=None) -> list[np.ndarray]:
    if encoder is None:
        encoder, dtype = _WORKER
    out = []
    for t in texts:
        ids = encoder.encode_ordinary(t)
        out.append(np.fromiter(ids, dtype=dtype, count=len(ids)))
    return out


def _make_pool(encoder, dtype, workers: int, backend: str) -> cf.Executor | None:
    """Worker pool for encoding; created before any progress bar so no thread is running when
    it forks."""
    if workers <= 1:
        return None
    if backend == "process" and "fork" in multiprocessing.get_all_start_methods():
        # fork: workers inherit the encoder instead of unpickling it.
        return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                      initializer=_init_worker, initargs=(encoder, dtype))
    return cf.ThreadPoolExecutor(workers)


def _ordered_results(tasks: Iterator[_Task], pool: cf.Executor | None, encoder, dtype,
                     workers: int) -> Iterator[tuple[_Task, list[np.ndarray]]]:
    """(task, token arrays) in input order, with a bounded number of tasks in flight."""
    if pool is None:
        for t in tasks:
            yield t, (t.chunks if t.chunks is not None else _encode_texts(t.texts, encoder, dtype))
        return
    if isinstance(pool, cf.ProcessPoolExecutor):
        submit = lambda texts: pool.submit(_encode_texts, texts)  # noqa: E731
    else:
        submit = lambda texts: pool.submit(_encode_texts, texts, encoder, dtype)  # noqa: E731
    pending: deque = deque()
    for t in tasks:
        if t.chunks is not None:
            fut = cf.Future()
            fut.set_result(t.chunks)
        else:
            fut = submit(t.texts)
        pending.append((t, fut))
        # The reader can only run ahead by this many tasks: memory stays flat.
        while len(pending) > 2 * workers + 1:
            t0, f0 = pending.popleft()
            yield t0, f0.result()
    while pending:
        t0, f0 = pending.popleft()
        yield t0, f0.result()


def _fixed_mmap_threshold() -> None:
    """Keep memory flat on glibc: text buffers of 256K-1M come and go at every piece, and after
    the first are freed glibc raises its mmap threshold and serves them from a heap that
    fragments (measured: +75 MB of RSS over 200 MB of input). A fixed threshold hands each one
    back to the OS when freed. Process-wide and harmless elsewhere; forked workers inherit it."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD = 128 KiB
    except (OSError, AttributeError):
        pass


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _ChunkWriter:
    """Appends documents' ids to an open token file and records the chunks as it goes."""

    def __init__(self, f: BinaryIO, dtype: np.dtype, eot: int, combine: int):
        self.f, self.dtype, self.combine = f, dtype, combine
        self.eot = np.array([eot], dtype=dtype)
        self.chunks: list[list[int]] = []
        self.n_tokens = self.n_docs = 0
        self.chunk_start: int | None = None
        self.chunk_chars = 0
        self.need_sep = False

    def write(self, arr: np.ndarray) -> None:
        arr.tofile(self.f)
        self.n_tokens += len(arr)

    def close_chunk(self) -> None:
        if self.chunk_start is not None:
            self.chunks.append([self.chunk_start, self.n_tokens - self.chunk_start])
        self.chunk_start, self.chunk_chars = None, 0

    def start_document(self) -> None:
        if self.need_sep:
            self.write(self.eot)
        if self.chunk_start is None:
            self.chunk_start = self.n_tokens
        self.n_docs += 1

    def end_document(self, chars: int) -> None:
        self.need_sep = True
        self.chunk_chars += chars
        if self.chunk_chars >= self.combine:
            self.close_chunk()

    def add_pieces(self, task: _Task, arrays: list[np.ndarray]) -> None:
        for starts, chars, arr in zip(task.doc_start, task.doc_chars, arrays):
            if starts:
                self.start_document()
            self.write(arr)
            if chars is not None:  # the document ends here
                self.end_document(chars)

    def add_chunks(self, arrays: list[np.ndarray], n_vocab: int, source: Path) -> None:
        """Pre-encoded input: each array stays a chunk of its own."""
        self.close_chunk()
        for arr in arrays:
            if len(arr) and int(arr.max()) >= n_vocab:
                raise UserError(f"{source}: holds token id {int(arr.max())}, beyond this "
                                f"encoder's {n_vocab} ids")
            if len(arr) == 0:
                continue
            self.start_document()
            self.n_docs += int(np.count_nonzero(arr == self.eot[0]))
            self.write(np.asarray(arr, dtype=self.dtype))
            self.need_sep = True
            self.close_chunk()


def encode_to_bin(inputs: str | os.PathLike | list[Path], out: str | os.PathLike, encoder,
                  combine: int = 50000, encoding: str = "utf-8", workers: int | None = None,
                  backend: str = "process", fingerprint: str | None = None,
                  quiet: bool = False, extra: dict | None = None, label: str | None = None
                  ) -> dict:
    """Stream ``inputs`` into the flat token file ``out`` (+ ``out.json``); returns the index.

    The file holds every document's ids, consecutive documents separated by ``eot_token``;
    the index lists the chunks as ``[start, length]`` (a chunk excludes the separators around
    it). Written atomically: a temp file in the same directory, renamed when complete.
    """
    paths = inputs if isinstance(inputs, list) else expand_paths(inputs)
    out = Path(out)
    workers = workers or default_workers()
    if encoder.eot_token is None:
        raise UserError("this tokenizer has no end-of-text token to separate documents with")
    dtype = token_dtype(encoder.n_vocab)
    sources = [Source.of(p) for p in paths]
    _fixed_mmap_threshold()

    def warn_empty(path: Path) -> None:
        if not quiet:
            tqdm.write(f"warning: {path} holds no text; skipped", file=sys.stderr)

    pool = None
    try:
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            pool = _make_pool(encoder, dtype, workers, backend)
            w = _ChunkWriter(f, dtype, int(encoder.eot_token), combine)
            with tqdm(total=sum(s.size for s in sources), unit="B", unit_scale=True,
                      desc=f"encoding {label or out.name}", disable=quiet, smoothing=0.1) as bar:
                tasks = _tasks(paths, encoding, splits_cleanly(encoder), warn_empty)
                for task, arrays in _ordered_results(tasks, pool, encoder, dtype, workers):
                    if task.chunks is not None:
                        w.add_chunks(arrays, encoder.n_vocab, task.source)
                    else:
                        w.add_pieces(task, arrays)
                    bar.update(task.nbytes)
            w.close_chunk()
            if w.n_tokens == 0:
                raise UserError(f"{_describe(inputs)}: no text to encode (all input files are "
                                "empty)")
            index_path(out).unlink(missing_ok=True)  # never a new .bin beside an old index
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    index = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "dtype": dtype.name, "n_tokens": w.n_tokens, "n_documents": w.n_docs,
        "n_chunks": len(w.chunks), "eot_token": int(encoder.eot_token),
        "n_vocab": int(encoder.n_vocab), "combine": combine, "encoding": encoding,
        "encoder_fingerprint": fingerprint or encoder_key(encoder),
        **(extra or {}),
        "sources": [s.record() for s in sources],
        "chunks": w.chunks,
    }
    write_text(index_path(out), json.dumps(index, indent=1))
    return index


def _describe(inputs) -> str:
    return str(inputs) if not isinstance(inputs, list) else f"{len(inputs)} input files"


def encode_corpus(in_text: str, out: str | os.PathLike, model_dir: str | os.PathLike,
           combine: int = 50000, encoding: str = "utf-8", workers: int | None = None,
           force: bool = False, quiet: bool = False) -> dict | None:
    """Encode ``in_text`` into ``out`` (``.npz`` or ``.bin``) with ``model_dir``'s encoder.

    Returns the ``.bin`` index, or None when the output was already up to date.
    """
    from ..tokenizer.files import encoder_fingerprint, load_encoder

    out = Path(out)
    if out.suffix not in (".npz", ".bin"):
        raise UserError(f"output {out} must end in .npz or .bin")
    if combine < 0:
        raise UserError(f"--combine must be >= 0, got {combine}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    # An output inside the input directory is not an input (nor its index or temp files).
    ours = {out.resolve(), index_path(out.resolve())}
    paths = [p for p in expand_paths(in_text) if p.resolve() not in ours
             and not (p.parent.resolve() == out.parent.resolve()
                      and p.name.startswith(out.name + ".") and p.suffix in (".tmp", ".bin"))]
    if not paths:
        raise UserError(f"{in_text} holds no input files besides the output {out}")
    fingerprint = encoder_fingerprint(model_dir)
    say = (lambda *a: None) if quiet else print
    if out.suffix == ".bin" and not force and is_up_to_date(
            out, paths, fingerprint, combine, encoding):
        say(f"{out} is up to date (same sources and encoder); nothing to do")
        return None
    encoder = load_encoder(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"Reading {len(paths)} file{'s' * (len(paths) != 1)}")
    # .npz is written from a temporary .bin: one encoding pipeline for both formats.
    target = out if out.suffix == ".bin" else temp_name(out)
    try:
        index = encode_to_bin(
            paths, target, encoder, combine=combine, encoding=encoding, workers=workers,
            fingerprint=fingerprint, quiet=quiet, label=out.name,
            extra={"encoder_dir": str(Path(model_dir).resolve())})
        if out.suffix == ".npz":
            say(f"Writing {out}")
            write_npz(load_bin(target), out)
    finally:
        if out.suffix == ".npz":
            for p in (target, index_path(target)):
                p.unlink(missing_ok=True)
    say(f"{out}: {index['n_tokens']:,} tokens, {index['n_documents']:,} documents, "
        f"{index['n_chunks']:,} chunks")
    return index


def is_up_to_date(out: Path, paths: list[Path], fingerprint: str, combine: int,
                  encoding: str) -> bool:
    """Whether ``out`` was encoded from exactly these files (size, mtime) with this encoder."""
    try:
        index = json.loads(index_path(out).read_text())
        return (index.get("format") == FORMAT
                and index.get("version") == FORMAT_VERSION
                and index.get("encoder_fingerprint") == fingerprint
                and index.get("combine") == combine and index.get("encoding") == encoding
                and index.get("sources") == [Source.of(p).record() for p in paths]
                and out.stat().st_size == index["n_tokens"] * np.dtype(index["dtype"]).itemsize)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def encoder_key(encoder) -> str:
    """A short identity of an encoder for cache keys: its ``fingerprint`` if it has one, else a
    hash of its ids on a probe text (different vocabularies disagree on it)."""
    fp = getattr(encoder, "fingerprint", None)
    if callable(fp):
        fp = fp()
    if isinstance(fp, str) and fp:
        return fp
    probe = _PROBE * 3 + " the of and to in is was for that on as with by"
    ids = list(encoder.encode_ordinary(probe))
    return "probe-" + hashlib.sha256(
        json.dumps([int(encoder.n_vocab), int(encoder.eot_token), ids]).encode()).hexdigest()[:32]
