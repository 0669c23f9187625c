"""The encoding pipeline: documents -> token arrays, streamed, in input order, on every core.

    for task, arrays in encoded(parts, encoder, ReadOptions(), workers=2, ...): ...

Files are read in blocks (:mod:`gpt2.data.sources`), cut into pieces where GPT-2's
pre-tokenizer would split anyway (so the ids equal encoding each document whole), batched into
tasks of ~512K characters and encoded by a pool of workers in input order, with a bounded
number of tasks in flight: memory stays flat however large the corpus. Writing the arrays into
token files is :mod:`gpt2.data.write`.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import hashlib
import json
import multiprocessing
import os
import re
import signal
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..files.memory import return_large_frees
from .sources import PRE_ENCODED, Part, ReadOptions, documents
from .tokens import TokenChunks, load_token_file

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
class Task:
    """Consecutive pieces for one worker, or pre-encoded chunks passed through."""
    texts: list[str] = field(default_factory=list)
    doc_start: list[bool] = field(default_factory=list)
    doc_chars: list[int | None] = field(default_factory=list)  # set on a document's last piece
    nbytes: int = 0
    chunks: TokenChunks | None = None
    source: Path | None = None


def _tasks(parts: list[Part], opts: ReadOptions, splittable: bool,
           on_empty: Callable[[Path], None]) -> Iterator[Task]:
    task, size = Task(), 0
    for part in parts:
        path = part.path
        if path.suffix.lower() in PRE_ENCODED:
            if task.texts or task.nbytes:
                yield task
                task, size = Task(), 0
            yield Task(chunks=load_token_file(path), nbytes=path.stat().st_size, source=path)
            continue
        had_text = False
        for doc in documents(part, opts):
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
                    task, size = Task(), 0
        if not had_text:
            on_empty(path)
    if task.texts or task.nbytes:
        yield task


_WORKER: tuple | None = None


_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _init_worker(encoder, dtype, parent: int) -> None:
    """A worker leaves Ctrl-C and SIGTERM to its parent, which stops the pool: killed in the
    middle of sending a result, a worker would leave half a message that the pool then waits
    for forever. It was forked with both blocked (see :func:`_submitting`), so none arrives
    while the parent's handlers are still in place."""
    global _WORKER
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    _WORKER = (encoder, dtype)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the process that forked it dies, however it
    dies (SIGKILL included), so no worker outlives an interrupted encode."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        # The parent died before prctl took effect: this worker was re-parented (to init, or
        # to a subreaper such as a container's init or a test runner).
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    except (OSError, AttributeError):
        pass


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
                                      initializer=_init_worker,
                                      initargs=(encoder, dtype, os.getpid()))
    return cf.ThreadPoolExecutor(workers)


def _ordered_results(tasks: Iterator[Task], pool: cf.Executor | None, encoder, dtype,
                     workers: int) -> Iterator[tuple[Task, list]]:
    """(task, token arrays) in input order, with a bounded number of tasks in flight."""
    if pool is None:
        for t in tasks:
            yield t, (t.chunks if t.chunks is not None else _encode_texts(t.texts, encoder, dtype))
        return
    if isinstance(pool, cf.ProcessPoolExecutor):
        submit = lambda texts: _submitting(pool, texts)  # noqa: E731
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


def _submitting(pool: cf.ProcessPoolExecutor, texts: list[str]) -> cf.Future:
    """``pool.submit`` with Ctrl-C and SIGTERM blocked: the pool forks its workers here, and a
    worker must not run the parent's handlers before its own are set (a signal sent to the
    process group meanwhile waits, and the worker then ignores it)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        return pool.submit(_encode_texts, texts)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fixed_mmap_threshold() -> None:
    """Keep memory flat on glibc: text buffers of 256K-1M come and go at every piece, and after
    the first are freed glibc raises its mmap threshold and serves them from a heap that
    fragments (measured: +75 MB of RSS over 200 MB of input). A fixed 128 KiB threshold hands
    each one back to the OS when freed. Process-wide and harmless elsewhere; forked workers
    inherit it."""
    return_large_frees(1 << 17)


def encoded(parts: list[Part], encoder, opts: ReadOptions, workers: int, backend: str,
            on_empty: Callable[[Path], None], dtype) -> Iterator[tuple[Task, list]]:
    """Every task of the input with its token arrays (pre-encoded ones: their chunks), in
    input order; the worker pool lives as long as the iteration."""
    _fixed_mmap_threshold()
    pool = _make_pool(encoder, dtype, workers, backend)
    try:
        tasks = _tasks(parts, opts, splits_cleanly(encoder), on_empty)
        yield from _ordered_results(tasks, pool, encoder, dtype, workers)
    except BaseException:  # Ctrl-C, SIGTERM, an error, or the reader stopped early: the
        if pool is not None:  # workers finish the task at hand (a fraction of a second), no more
            _stop(pool)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _stop(pool: cf.Executor, within: float = 10.0) -> None:
    """Shut the pool down without waiting on its workers, but wait (a bounded time) for the
    process pool's manager thread: left running, it closes its pipe while Python's exit hook
    writes to it ("Exception ignored ... Bad file descriptor" after the one line), and a
    later ``shutdown(wait=True)`` no longer knows the thread to join."""
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    if manager is not None:
        manager.join(within)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
