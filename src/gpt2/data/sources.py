"""Where training text comes from: the files a path names, and the documents in each file.

    paths = expand_paths("data/")             # a file, a directory (recursive, sorted) or a glob
    for doc in documents(path, "utf-8"):      # each document: a stream of (text, bytes read)
        for text, nbytes in doc: ...

File kinds, by extension:

- text files: one document each, read in 1 MiB blocks with universal newlines;
- ``.jsonl``: one document per record (its ``text`` field); ``.csv``: one per row (first column,
  after a header row);
- ``.npz`` and ``.bin`` (+ ``.bin.json``) are already tokens (:mod:`gpt2.data.tokens`).
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .tokens import INDEX_SUFFIX

READ_BYTES = 1 << 20              # text is read 1 MiB at a time
PRE_ENCODED = (".npz", ".bin")


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


# ----------------------------------------------------------------------------- reading documents

def text_blocks(path: Path, encoding: str) -> Iterator[tuple[str, int]]:
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


def documents(path: Path, encoding: str) -> Iterator[Iterator[tuple[str, int]]]:
    """Documents of a text-like file, each a stream of (text, bytes read) blocks."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv"):
        read = _jsonl_documents if suffix == ".jsonl" else _csv_documents
        for text, nbytes in read(path, encoding):
            yield iter([(text, nbytes)])
    else:
        yield text_blocks(path, encoding)
