"""Data files opened and read as records, one way for every file the tools read: training
examples and chats, benchmark rows, prompts, and the text of ``.jsonl`` corpora.

    for record, where in records(Path("train.jsonl.gz")):    # where: "train.jsonl.gz:12"
        text = field_text(record, "prompt", where)
    kind, compression = file_kind(path)                      # ("jsonl", ".gz")

Files: ``.jsonl`` (also ``.gz``/``.bz2``/``.xz``/``.zst``), ``.json`` (a list of records) and
``.parquet`` (``pip install 'gpt2[parquet]'``). Everything a file can get wrong is one
:class:`~gpt2.errors.UserError` naming the file and line, never a traceback and never a
silent guess: a line that is not JSON, bytes that are not UTF-8, a record nested deeper than
:data:`MAX_DEPTH`, a string holding a lone surrogate (``"\\ud800"``, which no text encodes),
a compressed file that is cut short or is not what its name says, and (``complete=True``, for
files of a known shape such as benchmarks) a last line without its line end, as a file cut
short at a record's end looks.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import re
import reprlib
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import UserError

READ_BYTES = 1 << 20              # text is read 1 MiB at a time
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
MAX_DEPTH = 32                    # objects and lists inside each other, at most
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 40
_short.maxlevel = 3


def describe(value) -> str:
    """A value as an error message shows it: short, whatever its size or depth."""
    return _short.repr(value)


def file_kind(path: Path) -> tuple[str, str | None]:
    """(kind, compression): kind is text, jsonl, json, csv, parquet, npz or bin."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    base = suffixes[-1] if suffixes else ""
    kinds = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
             ".npz": "npz", ".bin": "bin"}
    kind = kinds.get(base, "text")
    if compression and kind in ("parquet", "npz", "bin"):
        raise UserError(f"{path}: {base} files are read as they are, not {compression}-compressed"
                        f"; decompress it first")
    return kind, compression


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """What the decompressors raise on a damaged or truncated stream."""
    errors = (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)


@contextlib.contextmanager
def reading(path: Path, compression: str | None) -> Iterator[None]:
    """A corrupt, cut or unreadable file becomes one line naming it."""
    try:
        yield
    except UserError:
        raise
    except _corrupt_errors() as e:
        raise UserError(f"{path}: not a valid {compression or 'text'} file "
                        f"({e or 'cut short'})") from None
    except OSError as e:
        if e.errno is None:  # (bz2's "Invalid data stream")
            raise UserError(f"{path}: not a valid {compression or 'text'} file ({e})") from None
        what = f"a {compression} file" if compression else "it"
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def open_stream(path: Path, compression: str | None) -> tuple[BinaryIO, BinaryIO]:
    """(the decompressed byte stream, the raw file whose ``tell()`` says how far we read)."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    if compression is None:
        return raw, raw
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw), raw
    if compression == ".bz2":
        return bz2.BZ2File(raw), raw
    if compression == ".xz":
        return lzma.LZMAFile(raw), raw
    try:
        import zstandard
    except ImportError:
        raw.close()
        raise UserError(f"{path}: reading .zst needs the zstandard package: pip install "
                        "zstandard") from None
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return io.BufferedReader(reader, READ_BYTES), raw


def parquet_file(path: Path):
    """pyarrow's ParquetFile, or one line saying what is missing or wrong."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow: pip install 'gpt2[parquet]'"
                        ) from None
    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({str(e).strip()})") from None


def _too_deep(obj) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return True
            stack += [(v, depth + 1) for v in (value.values() if isinstance(value, dict)
                                                else value)]
    return False


def _lone_surrogate(obj) -> str | None:
    """The first string (key or value) holding a lone surrogate, if any."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack += list(value.keys()) + list(value.values())
        elif isinstance(value, list):
            stack += value
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return value[e.start]
    return None


def parse_json(text: str | bytes, where: str, what: str = "a JSON record"):
    """One JSON value, checked (see the module docstring); ``where`` names it in errors."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not {what} ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # (an integer of more digits than Python converts)
        raise UserError(f"{where}: not {what} ({e})") from None
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(value):
        raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if _SURROGATE.search(raw):
        bad = _lone_surrogate(value)
        if bad is not None:
            raise UserError(f"{where}: holds a lone surrogate (\\u{ord(bad):04x}), which is "
                            "not text")
    return value


def jsonl_lines(stream: BinaryIO, path: Path, first: int = 1, complete: bool = False,
                where=None) -> Iterator[tuple[object, str, bytes]]:
    """(record or None for a blank line, where, the line's bytes) of a stream of JSON lines.
    ``where(lineno, line)`` names a line (default ``file:line``)."""
    lineno = first - 1
    for line in stream:
        lineno += 1
        here = where(lineno, line) if where else f"{path}:{lineno}"
        if complete and not line.endswith(b"\n") and line.strip():
            raise UserError(f"{here}: the last record has no line end; is the file cut short?")
        yield (parse_json(line, here) if line.strip() else None), here, line


def records(path: Path, complete: bool = False) -> Iterator[tuple[object, str]]:
    """(record, "file:line") for each record of a .jsonl (compressed too), .json or .parquet
    file (see the module docstring)."""
    kind, compression = file_kind(path)
    if kind == "parquet":
        import pyarrow

        try:
            rows = parquet_file(path).read().to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable parquet file ({str(e).strip()})") from None
        for i, row in enumerate(rows, 1):
            yield row, f"{path}: row {i}"
    elif kind in ("json", "jsonl"):
        stream, raw = open_stream(path, compression)
        with raw, stream, reading(path, compression):
            if kind == "json":
                data = parse_json(stream.read(), str(path), "a JSON file")
                if not isinstance(data, list):
                    raise UserError(f"{path}: a .json file of records must be a list of them")
                for i, record in enumerate(data, 1):
                    yield record, f"{path}: record {i}"
                return
            for record, where, _ in jsonl_lines(stream, path, complete=complete):
                if record is not None:
                    yield record, where
    else:
        raise UserError(f"{path}: records come in .jsonl, .json or .parquet files")


def field_text(record, field: str, where: str, optional: bool = False, hint: str = "") -> str:
    """``record[field]``, which must be a string (``optional``: missing or null is "")."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object, not {describe(record)}")
    value = record.get(field)
    if value is None and optional:
        return ""
    if field not in record:
        fields = ", ".join(f'"{describe(k)[1:-1]}"' for k in list(record)[:8]) or "none"
        raise UserError(f'{where}: the record has no "{field}" field{hint} (it has {fields})')
    if not isinstance(value, str):
        raise UserError(f'{where}: its "{field}" field is {type(value).__name__}, not a string')
    return value
