"""Read and write TensorFlow checkpoints (OpenAI's GPT-2 release format) with numpy alone.

A TF checkpoint is a *prefix* such as ``models/124M/model.ckpt`` naming two files:

* ``<prefix>.index``: a LevelDB-style SSTable. Key ``""`` holds a BundleHeaderProto (number of
  data shards, endianness); every other key is a variable name whose value is a
  BundleEntryProto (dtype, shape, shard, offset, size, masked crc32c of the bytes); both
  formats are in :mod:`gpt2.files.tf_format`.
* ``<prefix>.data-00000-of-00001``: the raw tensors back to back, which we memory-map.

A model directory names its prefix in a text file called ``checkpoint``
(``model_checkpoint_path: "model.ckpt"``).

    from gpt2.files.tf_checkpoint import read_tf_checkpoint, write_tf_checkpoint
    tensors = read_tf_checkpoint("models/124M")          # {"model/wte": array [50257, 768], ...}
    write_tf_checkpoint("out/model.ckpt", tensors)        # readable by TensorFlow's Saver

Arrays come back as copy-on-write views of the memory-mapped data file: reading the 124M model
takes milliseconds and pages are loaded only when touched. bfloat16 (which numpy lacks) becomes
float32. Problems with the files raise :class:`gpt2.errors.UserError` naming the file.
"""

from __future__ import annotations

import ast
import math
import mmap
import os
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from .atomic import atomic_write
from . import tf_format
from .checksums import crc32c, native_crc32c, unmask
from .tf_format import TableWriter, encode_entry, encode_header, parse_entry, proto_fields, read_table

__all__ = ["read_tf_checkpoint", "list_tf_checkpoint", "resolve_checkpoint_prefix",
           "write_tf_checkpoint", "crc32c"]

DEFAULT_PREFIX = "model.ckpt"

# TensorFlow DataType enum -> numpy dtype. bfloat16 (14) is handled apart, string (7) skipped.
DT_TO_NUMPY = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
               9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32,
               23: np.uint64}
NUMPY_TO_DT = {np.dtype(v): k for k, v in DT_TO_NUMPY.items()}
DT_STRING, DT_BFLOAT16 = 7, 14


# --- locating a checkpoint ------------------------------------------------------------------

def _checkpoint_file_target(state_file: Path) -> Path:
    """The prefix named by a directory's ``checkpoint`` file (model_checkpoint_path)."""
    try:
        text = state_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{state_file}: not a text checkpoint state file") from None
    m = re.search(r'^\s*model_checkpoint_path\s*:\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')',
                  text, re.M)
    if not m:
        raise UserError(f"{state_file}: no model_checkpoint_path line in it")
    try:
        target = ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):
        target = m.group(1)[1:-1]
    target = Path(target)
    candidates = [target] if target.is_absolute() else [state_file.parent / target]
    # A checkpoint copied from another machine keeps that machine's absolute path in it.
    candidates.append(state_file.parent / target.name)
    for prefix in candidates:
        if _index_path(prefix).is_file():
            return prefix
    raise UserError(f"{state_file}: names checkpoint {str(target)!r}, but "
                    f"{_index_path(candidates[0])} does not exist")


def _index_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".index")


def resolve_checkpoint_prefix(path: str | os.PathLike) -> Path:
    """The checkpoint prefix for a model directory, a prefix, or a ``.index`` file path.

    A directory uses its ``checkpoint`` file (absolute paths from another machine fall back
    to the same name in the directory) and, without one, ``model.ckpt`` or its only index.
    """
    path = Path(os.path.expandvars(os.path.expanduser(os.fspath(path))))
    if path.is_dir():
        state = path / "checkpoint"
        if state.is_file():
            return _checkpoint_file_target(state)
        if _index_path(path / DEFAULT_PREFIX).is_file():
            return path / DEFAULT_PREFIX
        indexes = sorted(path.glob("*.index"))
        if len(indexes) == 1:
            return indexes[0].with_suffix("")
        if indexes:
            raise UserError(f"{path}: several checkpoints ({', '.join(p.name for p in indexes)}) "
                            "and no 'checkpoint' file saying which to use; pass a prefix")
        raise UserError(f"{path}: no TensorFlow checkpoint (no 'checkpoint' file, no *.index)")
    if path.suffix == ".index" and path.is_file():
        return path.with_suffix("")
    if _index_path(path).is_file():
        return path
    raise UserError(f"{path}: no such checkpoint ({_index_path(path)} does not exist)")


# --- reading --------------------------------------------------------------------------------

def _read_index(prefix: Path) -> tuple[dict, dict[str, dict]]:
    index = _index_path(prefix)
    header, entries = {"num_shards": 1, "endianness": 0}, {}
    for key, value in read_table(index):
        try:
            if key == b"":
                for number, v in proto_fields(value):
                    if number == 1:
                        header["num_shards"] = v
                    elif number == 2:
                        header["endianness"] = v
                continue
            entries[key.decode("utf-8")] = parse_entry(value)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"{index}: corrupt entry {key!r} ({e})") from None
    if header["num_shards"] < 1:
        raise UserError(f"{index}: corrupt header (num_shards = {header['num_shards']})")
    return header, entries


def _data_path(prefix: Path, shard: int, num_shards: int) -> Path:
    return prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")


def list_tf_checkpoint(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Variable name -> (dtype name as stored, shape), without touching the data files."""
    _, entries = _read_index(resolve_checkpoint_prefix(path))
    names = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
             7: "string", 9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16",
             22: "uint32", 23: "uint64"}
    return {k: (names.get(e["dtype"], f"dtype{e['dtype']}"), e["shape"]) for k, e in entries.items()}


def _map(path: Path) -> memoryview:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return memoryview(b"")
            # Copy-on-write: callers get writable arrays, the file is never modified.
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint data file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read checkpoint data file ({e.strerror})") from None


def read_tf_checkpoint(path: str | os.PathLike, verify: bool | None = None
                       ) -> dict[str, np.ndarray]:
    """Every variable of a TF checkpoint as numpy arrays, by name (sorted, as stored).

    ``path``: a model directory (its ``checkpoint`` file names the prefix), a prefix such as
    ``models/124M/model.ckpt``, or the ``.index`` file. ``verify``: check each tensor's crc32c;
    None (default) checks only when a C crc32c package is installed, True always does (numpy,
    ~2.5 s per 500 MB), False never. String tensors (TF2 object-graph metadata) are skipped.
    """
    prefix = resolve_checkpoint_prefix(path)
    index = _index_path(prefix)
    header, entries = _read_index(prefix)
    num_shards = header["num_shards"]
    byteorder = ">" if header["endianness"] == 1 else "<"
    check = None
    if verify is None:
        check = native_crc32c()
    elif verify:
        check = native_crc32c() or crc32c
    shards: dict[int, memoryview] = {}
    out = {}
    for name, e in entries.items():
        if e["dtype"] == DT_STRING:
            continue
        if e["sliced"]:
            raise UserError(f"{index}: variable {name!r} is partitioned into slices, "
                            "which is not supported")
        if e["dtype"] == DT_BFLOAT16:
            dtype = np.dtype(np.uint16)
        elif e["dtype"] in DT_TO_NUMPY:
            dtype = np.dtype(DT_TO_NUMPY[e["dtype"]])
        else:
            raise UserError(f"{index}: variable {name!r} has unsupported TensorFlow dtype "
                            f"{e['dtype']}")
        dtype = dtype.newbyteorder(byteorder) if dtype.itemsize > 1 else dtype
        shape = e["shape"]
        count = math.prod(shape)  # Python ints: a corrupt shape must not overflow
        if any(d < 0 for d in shape) or count * dtype.itemsize != e["size"]:
            raise UserError(f"{index}: variable {name!r} has shape {list(shape)} but "
                            f"{e['size']} bytes of data; the index is corrupt")
        if not 0 <= e["shard_id"] < num_shards:
            raise UserError(f"{index}: variable {name!r} is in shard {e['shard_id']}, but the "
                            f"checkpoint has {num_shards}")
        if e["shard_id"] not in shards:
            shards[e["shard_id"]] = _map(_data_path(prefix, e["shard_id"], num_shards))
        data = shards[e["shard_id"]]
        start, end = e["offset"], e["offset"] + e["size"]
        if start < 0 or end > len(data):
            raise UserError(f"{_data_path(prefix, e['shard_id'], num_shards)}: truncated "
                            f"({len(data)} bytes) or wrong file: variable {name!r} needs bytes "
                            f"{start}..{end}")
        raw = data[start:end]
        if check is not None and e["crc32c"] is not None and check(raw) != unmask(e["crc32c"]):
            raise UserError(f"{_data_path(prefix, e['shard_id'], num_shards)}: checksum "
                            f"mismatch in variable {name!r} (the file is corrupt)")
        array = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
        if e["dtype"] == DT_BFLOAT16:
            # bfloat16 is the top half of a float32: shift it into place.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        elif byteorder == ">":
            array = array.astype(dtype.newbyteorder("<"))
        out[name] = array
    return out


# --- writing --------------------------------------------------------------------------------

def write_tf_checkpoint(prefix: str | os.PathLike, tensors: dict[str, np.ndarray],
                        update_state_file: bool = True) -> Path:
    """Save ``tensors`` as ``<prefix>.index`` + ``<prefix>.data-00000-of-00001``; return prefix.

    TensorFlow's ``Saver.restore`` and ``tf.train.load_checkpoint`` read the result (checked
    with TF 2.21). Each file is written atomically (:mod:`gpt2.files.atomic`), data first. With
    ``update_state_file`` the directory's ``checkpoint`` file is pointed at this prefix. No ``.meta`` graph is written: nothing here needs one.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    table = TableWriter(block_size=tf_format.BLOCK_SIZE)
    table.add(b"", encode_header(1))
    parts, offset = [], 0
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):  # the table needs sorted keys
        if not name:
            raise ValueError("variable names must be non-empty (the empty key is the header)")
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("=")
        if dtype not in NUMPY_TO_DT:
            raise ValueError(f"{name}: dtype {array.dtype} has no TensorFlow equivalent here")
        # np.asarray, not ascontiguousarray, which turns scalars into shape [1]
        array = np.asarray(array, dtype=dtype.newbyteorder("<"), order="C")
        raw = memoryview(array).cast("B") if array.size else memoryview(b"")
        table.add(name.encode("utf-8"),
                  encode_entry(NUMPY_TO_DT[dtype], array.shape, offset, raw.nbytes, crc32c(raw)))
        parts.append(raw)
        offset += raw.nbytes
    files = [(_data_path(prefix, 0, 1), parts), (_index_path(prefix), [table.finish()])]
    if update_state_file:
        state = (f'model_checkpoint_path: "{prefix.name}"\n'
                 f'all_model_checkpoint_paths: "{prefix.name}"\n')
        files.append((prefix.parent / "checkpoint", [state.encode("utf-8")]))
    for path, content in files:  # data first: an index never names data not yet in place
        atomic_write(path, lambda tmp, content=content: _write_parts(tmp, content))
    return prefix


def _write_parts(path: Path, parts) -> None:
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)
