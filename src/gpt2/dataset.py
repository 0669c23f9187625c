"""Training data: find files, encode them into token chunks, draw training windows.

A dataset is a list of 1-D token arrays ("chunks"). A training window never crosses a chunk
boundary, so a chunk is a run of documents the model may read across; inside a chunk the
documents are separated by the id of ``<|endoftext|>`` (50256 for GPT-2), never by its text.

Inputs (a file, a directory walked recursively in sorted order, or a glob):

- text files: one document each;
- ``.jsonl``: one document per record (its ``text`` field); ``.csv``: one per row (first column,
  after a header row);
- ``.npz`` (``encode.py``'s original layout, each array a chunk) and ``.bin`` + ``.bin.json``
  (our flat token file, chunks are zero-copy memory maps): passed through unchanged.

``combine`` keeps the original meaning: documents are gathered into one chunk until it holds at
least ``combine`` characters (0 = one chunk per document).

Encoding streams: files are read in blocks, cut into pieces where GPT-2's pre-tokenizer would
split anyway (so the ids equal encoding each document whole), encoded by a pool of workers in
order, and written straight to a flat ``.bin`` file. Memory stays flat however large the corpus.

    chunks = load_dataset("data/", encoder)              # cached by content hash
    sampler = Sampler(chunks, seed=0)
    batch = sampler.sample_batch(8, 1024)                 # int64 [8, 1024]
    train, val, msg = split_validation(chunks, 0.05)
"""

from __future__ import annotations

import codecs
import concurrent.futures as cf
import ctypes
import csv
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import secrets
import sys
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from .errors import UserError

INDEX_SUFFIX = ".json"            # the index of X.bin is X.bin.json
FORMAT = "gpt2-tokens"
FORMAT_VERSION = 1
READ_BYTES = 1 << 20              # text is read 1 MiB at a time
PIECE_CHARS = 1 << 18             # pieces of ~256K characters ...
TASK_CHARS = 1 << 19              # ... batched into ~512K-character worker tasks
PRE_ENCODED = (".npz", ".bin")


# ----------------------------------------------------------------------------- finding files

def expand_paths(path: str | os.PathLike) -> list[Path]:
    """The files that ``path`` names: itself, every file below a directory, or a glob's matches.

    Directories and globs come out sorted so the same data always gives the same chunks. Hidden
    files and folders (``.git``, ``.DS_Store``) are skipped, and so is the ``.bin.json`` index of a
    ``.bin`` that is itself an input.
    """
    text = os.path.expanduser(str(path))
    p = Path(text)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = []
        for root, dirs, names in os.walk(p):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [Path(root, n) for n in names if not n.startswith(".")]
    else:
        files = [Path(f) for f in glob.glob(text, recursive=True) if os.path.isfile(f)]
    files = sorted(files, key=lambda f: f.as_posix())
    given = set(files)
    files = [f for f in files
             if not (f.name.endswith(".bin" + INDEX_SUFFIX) and f.with_suffix("") in given)]
    if not files:
        what = "directory" if p.is_dir() else "path or pattern"
        raise UserError(f"{what} {text} matches no files")
    return files


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


# ----------------------------------------------------------------------------- reading documents

def _text_blocks(path: Path, encoding: str) -> Iterator[tuple[str, int]]:
    """(text, bytes read) blocks of a text file, decoded with universal newlines like open()."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise UserError(f"unknown text encoding {encoding!r} (--encoding)") from None
    offset, pending_cr = 0, ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(READ_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                at = offset + max(e.start, 0)
                raise UserError(f"{path}: byte {at} is not valid {encoding}; is it a text file? "
                                f"(pass the right --encoding, e.g. latin-1)") from None
            offset += len(raw)
            text = pending_cr + text
            # A "\r" at a block's end may be the first half of "\r\n": hold it back.
            pending_cr = "\r" if raw and text.endswith("\r") else ""
            if pending_cr:
                text = text[:-1]
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            yield text, len(raw)
            if not raw:
                return


def _jsonl_documents(path: Path, encoding: str) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not valid {encoding} (--encoding)") from None
            if not line.strip():
                yield "", len(raw)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not a JSON record ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{lineno}: a .jsonl record needs a string \"text\" field")
            yield record["text"], len(raw)


def _csv_documents(path: Path, encoding: str) -> Iterator[tuple[str, int]]:
    csv.field_size_limit(2**31 - 1)  # a document is one field: lift the 128K default
    with open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding=encoding, newline="")
        try:
            rows = csv.reader(text)
            next(rows, None)  # header row
            done = 0
            for row in rows:
                pos = raw.tell()  # advances in buffer-sized steps: good enough for progress
                yield (row[0] if row else ""), pos - done
                done = pos
            yield "", os.path.getsize(path) - done
        except UnicodeDecodeError:
            raise UserError(f"{path}: not valid {encoding} (--encoding)") from None
        except csv.Error as e:
            raise UserError(f"{path}: not a valid CSV file ({e})") from None


def load_token_file(path: Path) -> list[np.ndarray]:
    """The chunks of a pre-encoded ``.npz`` or ``.bin`` (+ ``.bin.json``) file."""
    if path.suffix.lower() == ".bin":
        return _load_bin(path)
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
    index_path = Path(str(path) + INDEX_SUFFIX)
    try:
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT:
            raise ValueError("not a gpt2-tokens index")
        np.dtype(index["dtype"])
        return index
    except FileNotFoundError:
        raise UserError(f"{path}: its index {index_path.name} is missing (re-run encode)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{index_path}: not a valid token index ({e})") from None


def _load_bin(path: Path) -> list[np.ndarray]:
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


@dataclass
class Source:
    """One input file, as recorded in a ``.bin.json`` index."""
    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "Source":
        st = path.stat()
        return cls(path, st.st_size, st.st_mtime_ns)

    def record(self) -> dict:
        return {"path": str(self.path.resolve()), "size": self.size, "mtime_ns": self.mtime_ns}


def _documents(path: Path, encoding: str) -> Iterator[Iterator[tuple[str, int]]]:
    """Documents of a text-like file, each a stream of (text, bytes read) blocks."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv"):
        read = _jsonl_documents if suffix == ".jsonl" else _csv_documents
        for text, nbytes in read(path, encoding):
            yield iter([(text, nbytes)])
    else:
        yield _text_blocks(path, encoding)


# ----------------------------------------------------------------------------- cutting text

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


def _pieces(blocks: Iterable[tuple[str, int]], piece_chars: int, splittable: bool
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


# ----------------------------------------------------------------------------- parallel encoding

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
        for doc in _documents(path, encoding):
            chars = 0
            for text, nbytes, last in _pieces(doc, PIECE_CHARS, splittable):
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


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
    eot = int(encoder.eot_token)
    dtype = token_dtype(encoder.n_vocab)
    splittable = splits_cleanly(encoder)
    sources = [Source.of(p) for p in paths]
    _fixed_mmap_threshold()

    def warn_empty(path: Path) -> None:
        if not quiet:
            tqdm.write(f"warning: {path} holds no text; skipped", file=sys.stderr)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    chunks: list[list[int]] = []
    n_tokens = n_docs = 0
    chunk_start, chunk_chars, need_sep = None, 0, False
    eot_arr = np.array([eot], dtype=dtype)
    f = os.fdopen(fd, "wb")
    pool = None
    try:
        pool = _make_pool(encoder, dtype, workers, backend)
        with f, tqdm(total=sum(s.size for s in sources), unit="B", unit_scale=True,
                     desc=f"encoding {label or out.name}", disable=quiet, smoothing=0.1) as bar:

            def write(arr: np.ndarray) -> None:
                nonlocal n_tokens
                arr.tofile(f)
                n_tokens += len(arr)

            def close_chunk() -> None:
                nonlocal chunk_start, chunk_chars
                if chunk_start is not None:
                    chunks.append([chunk_start, n_tokens - chunk_start])
                chunk_start, chunk_chars = None, 0

            def start_document() -> None:
                nonlocal need_sep, chunk_start, n_docs
                if need_sep:
                    write(eot_arr)
                if chunk_start is None:
                    chunk_start = n_tokens
                n_docs += 1

            tasks = _tasks(paths, encoding, splittable, warn_empty)
            for task, arrays in _ordered_results(tasks, pool, encoder, dtype, workers):
                if task.chunks is not None:  # pre-encoded: each array stays its own chunk
                    close_chunk()
                    for arr in arrays:
                        if len(arr) and int(arr.max()) >= encoder.n_vocab:
                            raise UserError(f"{task.source}: holds token id {int(arr.max())}, "
                                            f"beyond this encoder's {encoder.n_vocab} ids")
                        if len(arr) == 0:
                            continue
                        start_document()
                        n_docs += int(np.count_nonzero(arr == eot))
                        write(np.asarray(arr, dtype=dtype))
                        need_sep = True
                        close_chunk()
                else:
                    for starts, chars, arr in zip(task.doc_start, task.doc_chars, arrays):
                        if starts:
                            start_document()
                        write(arr)
                        if chars is not None:  # the document ends here
                            need_sep = True
                            chunk_chars += chars
                            if chunk_chars >= combine:
                                close_chunk()
                bar.update(task.nbytes)
            close_chunk()
        if n_tokens == 0:
            raise UserError(f"{_describe(inputs)}: no text to encode (all input files are empty)")
        index = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "dtype": dtype.name, "n_tokens": n_tokens, "n_documents": n_docs,
            "n_chunks": len(chunks), "eot_token": eot, "n_vocab": int(encoder.n_vocab),
            "combine": combine, "encoding": encoding,
            "encoder_fingerprint": fingerprint or encoder_key(encoder),
            **(extra or {}),
            "sources": [s.record() for s in sources],
            "chunks": chunks,
        }
        index_path = Path(str(out) + INDEX_SUFFIX)
        index_path.unlink(missing_ok=True)  # never leave a new .bin beside an old index
        os.replace(tmp, out)
        _atomic_write_text(index_path, json.dumps(index, indent=1))
        return index
    finally:
        f.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _describe(inputs) -> str:
    return str(inputs) if not isinstance(inputs, list) else f"{len(inputs)} input files"


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_up_to_date(out: Path, paths: list[Path], fingerprint: str, combine: int,
                  encoding: str) -> bool:
    """Whether ``out`` was encoded from exactly these files (size, mtime) with this encoder."""
    try:
        index = json.loads(Path(str(out) + INDEX_SUFFIX).read_text())
        return (index.get("format") == FORMAT
                and index.get("version") == FORMAT_VERSION
                and index.get("encoder_fingerprint") == fingerprint
                and index.get("combine") == combine and index.get("encoding") == encoding
                and index.get("sources") == [Source.of(p).record() for p in paths]
                and out.stat().st_size == index["n_tokens"] * np.dtype(index["dtype"]).itemsize)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ----------------------------------------------------------------------------- load_dataset

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
        if out.exists() and Path(str(out) + INDEX_SUFFIX).exists():
            if not quiet:
                print(f"Using cached encoding {out}")
        else:
            encode_to_bin(paths, out, encoder, combine=combine, encoding=encoding,
                          workers=workers, quiet=quiet)
        chunks = _load_bin(out)
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        raise UserError(f"dataset {path} holds no tokens")
    if not quiet:
        print(f"dataset has {sum(len(c) for c in chunks):,} tokens in {len(chunks):,} chunks")
    return chunks


# ----------------------------------------------------------------------------- sampling

class Sampler:
    """Draws training windows uniformly over every valid start position of every chunk.

    A window of length L starts anywhere in [0, len(chunk) - L] (inclusive, so a chunk's last
    token can be read); chunks shorter than L are never used. Draw number i uses its own RNG
    seeded from (seed, rank, i): the state is just a counter, every rank draws different
    windows, and a resumed run draws exactly what an uninterrupted run would have.
    """

    def __init__(self, chunks: list[np.ndarray], seed: int | None = None, rank: int = 0,
                 world_size: int = 1, name: str = "dataset"):
        self.chunks = [c for c in chunks if len(c)]
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self.rank, self.world_size, self.name = int(rank), int(world_size), name
        self.draws = 0
        self.n_tokens = sum(len(c) for c in self.chunks)
        self._starts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _valid_starts(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        if length not in self._starts:
            usable = np.array([i for i, c in enumerate(self.chunks) if len(c) >= length],
                              dtype=np.int64)
            if len(usable) == 0:
                longest = max((len(c) for c in self.chunks), default=0)
                raise UserError(
                    f"{self.name} has no document of at least {length} tokens (the longest "
                    f"chunk has {longest}); use more or longer text, a larger --combine, "
                    f"or a shorter window")
            counts = np.array([len(self.chunks[i]) - length + 1 for i in usable], dtype=np.int64)
            self._starts[length] = (usable, np.cumsum(counts))
        return self._starts[length]

    def _window(self, index: int, length: int, usable, cum) -> np.ndarray:
        k = int(np.searchsorted(cum, index, side="right"))
        start = index - (int(cum[k - 1]) if k else 0)
        return self.chunks[usable[k]][start:start + length]

    def sample_batch(self, batch_size: int, length: int) -> np.ndarray:
        """``[batch_size, length]`` int64 windows."""
        usable, cum = self._valid_starts(length)
        rng = np.random.default_rng([self.seed, self.rank, self.draws])
        self.draws += 1
        picks = rng.integers(0, int(cum[-1]), size=batch_size)
        return np.stack([self._window(int(i), length, usable, cum) for i in picks]
                        ).astype(np.int64)

    def sample(self, length: int) -> np.ndarray:
        """One window of ``length`` tokens."""
        return self.sample_batch(1, length)[0]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        # The rank stays this process's own: one saved state resumes every rank.
        self.seed, self.draws = int(state["seed"]), int(state["draws"])


def validation_batches(chunks: list[np.ndarray], n_batches: int, batch_size: int, length: int,
                       seed: int = 1, name: str = "validation data") -> list[np.ndarray]:
    """Fixed validation windows, drawn once (the original: a Sampler seeded 1)."""
    sampler = Sampler(chunks, seed=seed, name=name)
    return [sampler.sample_batch(batch_size, length) for _ in range(n_batches)]


def split_validation(chunks: list[np.ndarray], fraction: float, seed: int = 1
                     ) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Hold out the last ``fraction`` of the tokens (cut out of the chunks) for validation.

    The split is positional, so the same data always gives the same split; ``seed`` is accepted
    for interface compatibility and does not change it.
    """
    if not 0 < fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {fraction}")
    total = sum(len(c) for c in chunks)
    n_val = int(round(total * fraction))
    if n_val == 0 or n_val == total:
        raise UserError(f"--val_fraction {fraction} of {total} tokens leaves nothing to "
                        f"{'validate on' if n_val == 0 else 'train on'}")
    train, val, need = list(chunks), [], n_val
    while need:
        last = train.pop()
        if len(last) <= need:
            val.insert(0, last)
            need -= len(last)
        else:
            train.append(last[:len(last) - need])
            val.insert(0, last[len(last) - need:])
            need = 0
    message = (f"validation: holding out the last {fraction:.1%} of the data, "
               f"{n_val:,} of {total:,} tokens ({len(val)} chunk{'s' * (len(val) != 1)}); "
               f"training on {total - n_val:,}")
    return train, val, message
