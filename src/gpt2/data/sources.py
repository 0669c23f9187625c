"""Where training text comes from: the files a path names, and the documents in each file.

    paths = expand_paths("data/")                      # a file, a directory (recursive, sorted), a glob
    for doc in documents(path, ReadOptions()):         # each document: a stream of (text, bytes read)
        for text, nbytes in doc: ...
    parts = split_into_parts(paths, 16)                # 16 disjoint parts whose union is the whole

File kinds, by extension (after a compression suffix, if any):

- text files: one document each, read in 1 MiB blocks with universal newlines;
- ``.jsonl``: one document per record (its ``text`` field, ``--text_field``); ``.csv``: one per
  row (the first column, after a header row); ``.parquet``: one per row of the ``text`` column,
  read a row group at a time (``pip install 'gpt2[parquet]'``);
- ``.gz``, ``.bz2``, ``.xz`` and ``.zst`` versions of text, ``.jsonl`` and ``.csv`` files,
  decompressed as a stream (``corpus.txt.gz``, ``pile.jsonl.zst``);
- ``.npz`` and ``.bin`` (+ ``.bin.json``) are already tokens (:mod:`gpt2.data.tokens`).

The literal text ``<|endoftext|>`` inside a document separates documents (as gpt-2-simple
taught its users to join them), unless ``ReadOptions.split_eot`` is off.
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .records import (READ_BYTES, field_text, file_kind, open_stream, parquet_file, parse_json,
                      reading)
from .tokens import INDEX_SUFFIX

PRE_ENCODED = (".npz", ".bin")
EOT = "<|endoftext|>"

# (text, bytes of the file consumed, whether a document ends after this text)
Segment = tuple[str, int, bool]


@dataclass(frozen=True)
class ReadOptions:
    """How text files are read: ``--encoding``, ``--text_field``, ``<|endoftext|>`` splitting."""

    encoding: str = "utf-8"
    text_field: str = "text"
    split_eot: bool = True


@dataclass(frozen=True)
class Part:
    """What one reader reads of a file: all of it, or the records starting in [start, stop).

    ``start``/``stop`` are byte offsets for uncompressed ``.jsonl`` files and row-group numbers
    for ``.parquet``; other files are always read whole.
    """

    path: Path
    start: int = 0
    stop: int | None = None


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
    dangling = [f for f in files if not f.exists()]
    if dangling:
        raise UserError(f"{dangling[0]}: a link to a file that does not exist")
    files = sorted(files, key=lambda f: f.as_posix())
    given = set(files)
    files = [f for f in files
             if not (f.name.endswith(".bin" + INDEX_SUFFIX) and f.with_suffix("") in given)]
    if not files:
        what = "directory" if p.is_dir() else "path or pattern"
        raise UserError(f"{what} {text} matches no files")
    return files


# ----------------------------------------------------------------------------- opening files

# ----------------------------------------------------------------------------- reading segments

def _decoder(encoding: str):
    try:
        return codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise UserError(f"unknown text encoding {encoding!r} (--encoding)") from None


def _text_segments(part: Part, opts: ReadOptions, compression: str | None) -> Iterator[Segment]:
    """A text file as one document: (text, bytes read) blocks with universal newlines."""
    decoder = _decoder(opts.encoding)
    offset, pending_cr, done = 0, "", 0
    stream, raw = open_stream(part.path, compression)
    with raw, stream, reading(part.path, compression):
        while True:
            data = stream.read(READ_BYTES)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                at = offset + max(e.start, 0)
                raise UserError(f"{part.path}: byte {at} is not valid {opts.encoding}; is it a "
                                "text file? (pass the right --encoding, e.g. latin-1)") from None
            offset += len(data)
            text = pending_cr + text
            # A "\r" at a block's end may be the first half of "\r\n": hold it back.
            pending_cr = "\r" if data and text.endswith("\r") else ""
            if pending_cr:
                text = text[:-1]
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            pos = raw.tell()
            yield text, pos - done, not data
            done = pos
            if not data:
                return


def _jsonl_segments(part: Part, opts: ReadOptions, compression: str | None
                    ) -> Iterator[Segment]:
    stream, raw = open_stream(part.path, compression)
    with raw, stream, reading(part.path, compression):
        lineno, done = 0, 0
        if part.start:  # a record that began before our range belongs to the previous part
            raw.seek(part.start - 1)
            if raw.read(1) != b"\n":
                raw.readline()
        while part.stop is None or raw.tell() < part.stop:
            data = stream.readline()
            if not data:
                return
            lineno += 1
            where = (f"{part.path}:{lineno}" if not part.start else
                     f"{part.path}: the record at byte {raw.tell() - len(data)}")
            try:
                line = data.decode(opts.encoding)
            except UnicodeDecodeError:
                raise UserError(f"{where}: not valid {opts.encoding} (--encoding)") from None
            text = field_text(parse_json(line, where), opts.text_field, where,
                              hint=" (--text_field picks another)") if line.strip() else ""
            pos = raw.tell()
            yield text, pos - done, True
            done = pos


def _csv_segments(part: Part, opts: ReadOptions, compression: str | None) -> Iterator[Segment]:
    csv.field_size_limit(2**31 - 1)  # a document is one field: lift the 128K default
    stream, raw = open_stream(part.path, compression)
    with raw, stream, reading(part.path, compression):
        text = io.TextIOWrapper(stream, encoding=opts.encoding, newline="")
        try:
            rows = csv.reader(text)
            next(rows, None)  # header row
            done = 0
            for row in rows:
                pos = raw.tell()  # advances in buffer-sized steps: good enough for progress
                yield (row[0] if row else ""), pos - done, True
                done = pos
            yield "", os.path.getsize(part.path) - done, True
        except UnicodeDecodeError:
            raise UserError(f"{part.path}: not valid {opts.encoding} (--encoding)") from None
        except csv.Error as e:
            raise UserError(f"{part.path}: not a valid CSV file ({e})") from None


def _parquet_segments(part: Part, opts: ReadOptions) -> Iterator[Segment]:
    pf = parquet_file(part.path)
    import pyarrow

    names = pf.schema_arrow.names
    if opts.text_field not in names:
        raise UserError(f"{part.path}: no column {opts.text_field!r} (--text_field picks "
                        f"another; it has {', '.join(map(repr, names[:8]))})")
    meta = pf.metadata
    sizes = row_group_sizes(part.path, pf)
    stop = meta.num_row_groups if part.stop is None else part.stop
    row = sum(meta.row_group(i).num_rows for i in range(part.start))
    for group in range(part.start, stop):
        try:
            column = pf.read_row_group(group, columns=[opts.text_field]).column(0)
        except (pyarrow.ArrowException, OSError) as e:
            raise UserError(f"{part.path}: row group {group} is unreadable "
                            f"({str(e).strip()})") from None
        if not (pyarrow.types.is_string(column.type) or pyarrow.types.is_large_string(column.type)):
            raise UserError(f"{part.path}: row {row + 1}: column {opts.text_field!r} holds "
                            f"{column.type}, not text")
        values = column.to_pylist()
        share = sizes[group] // max(len(values), 1)
        for i, value in enumerate(values):
            if value is None:
                raise UserError(f"{part.path}: row {row + i + 1}: {opts.text_field!r} is null, "
                                "not a string")
            yield value, share if i else sizes[group] - share * (len(values) - 1), True
        row += len(values)


def row_group_sizes(path: Path, pf=None) -> list[int]:
    """Each row group's share of the file's bytes (its compressed size; the footer goes to the
    last), so that progress and parts can count parquet files in bytes like any other."""
    pf = pf or parquet_file(path)
    meta = pf.metadata
    sizes = [sum(meta.row_group(g).column(c).total_compressed_size
                 for c in range(meta.row_group(g).num_columns))
             for g in range(meta.num_row_groups)]
    if sizes:
        sizes[-1] += max(0, path.stat().st_size - sum(sizes))
    return sizes


def _split_eot(segments: Iterator[Segment]) -> Iterator[Segment]:
    """End a document at every literal ``<|endoftext|>`` (the marker itself is dropped), also
    when it straddles two blocks."""
    carry, carry_bytes = "", 0
    for text, nbytes, ends in segments:
        text, nbytes = carry + text, nbytes + carry_bytes
        carry, carry_bytes = "", 0
        *done, last = text.split(EOT)
        for piece in done:
            yield piece, nbytes, True
            nbytes = 0
        if not ends:
            keep = next((k for k in range(min(len(EOT) - 1, len(last)), 0, -1)
                         if EOT.startswith(last[-k:])), 0)
            if keep:
                last, carry, carry_bytes = last[:-keep], last[-keep:], 0
        yield last, nbytes, ends
    if carry:
        yield carry, carry_bytes, True


def segments(part: Part | Path, opts: ReadOptions) -> Iterator[Segment]:
    """The text of a file (or part of one) as segments, documents marked where they end."""
    part = part if isinstance(part, Part) else Part(Path(part))
    kind, compression = file_kind(part.path)
    if kind == "parquet":
        found = _parquet_segments(part, opts)
    else:
        read = {"jsonl": _jsonl_segments, "csv": _csv_segments}.get(kind, _text_segments)
        found = read(part, opts, compression)
    return _split_eot(found) if opts.split_eot else found


def documents(part: Part | Path, opts: ReadOptions | str = ReadOptions()
              ) -> Iterator[Iterator[tuple[str, int]]]:
    """Documents of a text-like file, each a stream of (text, bytes read) blocks.

    Each document must be read to its end before the next is asked for.
    """
    opts = ReadOptions(encoding=opts) if isinstance(opts, str) else opts
    stream = segments(part, opts)
    finished = False

    def document() -> Iterator[tuple[str, int]]:
        nonlocal finished
        for text, nbytes, ends in stream:
            yield text, nbytes
            if ends:
                return
        finished = True

    while not finished:
        doc = document()
        yield doc
        for _ in doc:  # whatever the caller left unread
            pass


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


# ----------------------------------------------------------------------------- parts of an input

def split_into_parts(paths: list[Path], num_parts: int) -> list[list[Part]]:
    """``num_parts`` disjoint parts of the input whose concatenation, in order, is the whole.

    The input's bytes (files in order) are cut into equal ranges; a file goes to the part its
    first byte falls in, except that uncompressed ``.jsonl`` files are cut between records and
    ``.parquet`` files between row groups, so one big file still spreads over many parts.
    Every part can be computed on its own (a Slurm array task computes only its own).
    """
    sizes = [p.stat().st_size for p in paths]
    total = max(sum(sizes), 1)
    owner = lambda x: min(num_parts - 1, x * num_parts // total)  # noqa: E731
    parts: list[list[Part]] = [[] for _ in range(num_parts)]
    offset = 0
    for path, size in zip(paths, sizes):
        kind, compression = file_kind(path)
        if kind == "jsonl" and compression is None and size:
            first, last = owner(offset), owner(offset + size - 1)
            for i in range(first, last + 1):
                lo = max(0, -(-i * total // num_parts) - offset)
                hi = min(size, -(-(i + 1) * total // num_parts) - offset)
                parts[i].append(Part(path, lo, hi if i < last else None))
        elif kind == "parquet":
            starts = [offset]
            for s in row_group_sizes(path)[:-1]:
                starts.append(starts[-1] + s)
            groups: dict[int, list[int]] = {}
            for g, start in enumerate(starts):
                groups.setdefault(owner(start), []).append(g)
            for i, gs in groups.items():
                parts[i].append(Part(path, gs[0], gs[-1] + 1))
        else:
            parts[owner(offset)].append(Part(path))
        offset += size
    return parts
