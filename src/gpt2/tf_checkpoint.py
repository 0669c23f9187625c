"""Read and write TensorFlow checkpoints (OpenAI's GPT-2 release format) with numpy alone.

A TF checkpoint is a *prefix* such as ``models/124M/model.ckpt`` naming two files:

* ``<prefix>.index``: a LevelDB-style SSTable. Key ``""`` holds a BundleHeaderProto (number of
  data shards, endianness); every other key is a variable name whose value is a
  BundleEntryProto (dtype, shape, shard, offset, size, masked crc32c of the bytes).
* ``<prefix>.data-00000-of-00001``: the raw tensors back to back, which we memory-map.

A model directory names its prefix in a text file called ``checkpoint``
(``model_checkpoint_path: "model.ckpt"``).

    from gpt2.tf_checkpoint import read_tf_checkpoint, write_tf_checkpoint
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
import struct
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError

__all__ = ["read_tf_checkpoint", "list_tf_checkpoint", "resolve_checkpoint_prefix",
           "write_tf_checkpoint", "crc32c"]

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
DEFAULT_PREFIX = "model.ckpt"
_BLOCK_SIZE = 262144  # TensorFlow's table block size; tests shrink it to get many blocks

# TensorFlow DataType enum -> numpy dtype. bfloat16 (14) is handled apart, string (7) skipped.
DT_TO_NUMPY = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
               9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32,
               23: np.uint64}
NUMPY_TO_DT = {np.dtype(v): k for k, v in DT_TO_NUMPY.items()}
DT_STRING, DT_BFLOAT16 = 7, 14


# --- crc32c (Castagnoli), vectorised with numpy ---------------------------------------------

def _crc_tables() -> np.ndarray:
    """Slicing-by-4 tables: tables[k][b] is the CRC register after byte b and k zero bytes."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    tables = [t]
    for _ in range(3):
        prev = tables[-1]
        tables.append((prev >> 8) ^ t[prev & 0xFF])
    return np.stack(tables)


_TABLES = _crc_tables()
_TABLE0 = _TABLES[0].tolist()
_CHUNK_BYTES = 32 << 20  # bytes per vectorised pass, so memory stays flat on big tensors


def _apply(shift: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Apply a linear map on CRC registers given as 4 byte tables (shift[k][byte k of r])."""
    return (shift[0][r & 0xFF] ^ shift[1][(r >> 8) & 0xFF]
            ^ shift[2][(r >> 16) & 0xFF] ^ shift[3][r >> 24])


_SHIFT_POW2: list[np.ndarray] = []  # _SHIFT_POW2[i]: feeding 2**i zero bytes into the register


def _shift_table(n: int) -> np.ndarray:
    """Byte tables of the (linear) map 'feed n > 0 zero bytes' on a raw CRC register."""
    if not _SHIFT_POW2:
        # r[k][b]: a register holding byte b at byte position k
        r = np.arange(256, dtype=np.uint32)[None, :] << (np.arange(4, dtype=np.uint32)[:, None] * 8)
        _SHIFT_POW2.append(_TABLES[0][r & 0xFF] ^ (r >> 8))
    while (1 << len(_SHIFT_POW2)) <= n:
        s = _SHIFT_POW2[-1]
        _SHIFT_POW2.append(_apply(s, s))
    out = None
    for i in range(n.bit_length()):
        if n >> i & 1:
            out = _SHIFT_POW2[i] if out is None else _apply(_SHIFT_POW2[i], out)
    return out


def _shift(r: int, n: int) -> int:
    return int(_apply(_shift_table(n), np.array([r], dtype=np.uint32))[0]) if n else r


def _raw_small(data, r: int = 0) -> int:
    for b in bytes(data):
        r = _TABLE0[(r ^ b) & 0xFF] ^ (r >> 8)
    return r


def _raw_lanes(words: np.ndarray) -> int:
    """Raw CRC (register starting at 0) of a [lanes, words] uint32 array read row after row."""
    lanes = words.shape[0]
    r = np.zeros(lanes, dtype=np.uint32)
    t0, t1, t2, t3 = _TABLES
    for j in range(words.shape[1]):  # every lane advances one 4-byte word per step
        r ^= words[:, j]
        r = t3[r & 0xFF] ^ t2[(r >> 8) & 0xFF] ^ t1[(r >> 16) & 0xFF] ^ t0[r >> 24]
    # Combine neighbours pairwise: crc(A + B) = shift_len(B)(crc(A)) ^ crc(B). Zero lanes in
    # front pad the count to a power of two; a zero register fed any bytes stays zero.
    size = 1 << (lanes - 1).bit_length()
    r = np.concatenate([np.zeros(size - lanes, dtype=np.uint32), r])
    span = words.shape[1] * 4
    while r.size > 1:
        r = _apply(_shift_table(span), r[0::2]) ^ r[1::2]
        span *= 2
    return int(r[0])


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of ``data`` (bytes-like), continuing from ``crc`` (the value for earlier bytes).

    Vectorised with numpy (many lanes of the buffer advance together, then their CRCs are
    combined), so checksumming a 500 MB checkpoint takes seconds rather than minutes.
    """
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    n = buf.size
    # Standard CRC-32C starts the register at ~0 and inverts the result; the raw register is
    # linear, so the start value's contribution is just a shift by n bytes.
    start = _shift(crc ^ 0xFFFFFFFF, n)
    raw, pos = 0, 0
    for width in (1024, 64, 16):  # narrower lanes for the tail; numpy pays off from ~16 lanes
        while (n - pos) // width >= 16:
            lanes = min((n - pos) // width, _CHUNK_BYTES // width)
            piece = buf[pos:pos + lanes * width]
            raw = _shift(raw, piece.size) ^ _raw_lanes(piece.view("<u4").reshape(lanes, -1))
            pos += piece.size
    raw = _raw_small(buf[pos:], raw)
    return start ^ raw ^ 0xFFFFFFFF


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _native_crc32c():
    """A C implementation of crc32c when one happens to be installed (never a dependency)."""
    try:
        import google_crc32c

        return lambda b: google_crc32c.value(bytes(b))
    except ImportError:
        pass
    try:
        import crc32c as crc32c_module

        return crc32c_module.crc32c
    except ImportError:
        return None


# --- varints and protobuf wire format -------------------------------------------------------

def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _put_varint(out: bytearray, value: int) -> None:
    value &= (1 << 64) - 1  # negative int64 values take ten bytes, as in protobuf
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into (field number, value) pairs; unknown fields are kept."""
    fields, pos, end = [], 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            if pos + 8 > end:
                raise ValueError("truncated fixed64")
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise ValueError("truncated length-delimited field")
            value, pos = bytes(buf[pos:pos + size]), pos + size
        elif wire == 5:
            if pos + 4 > end:
                raise ValueError("truncated fixed32")
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.append((number, value))
    return fields


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_entry(value: bytes) -> dict:
    """BundleEntryProto -> {dtype, shape, shard_id, offset, size, crc32c, sliced}."""
    entry = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": None,
             "sliced": False}
    for number, v in _proto_fields(value):
        if number == 1:
            entry["dtype"] = v
        elif number == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
            dims = []
            for n, dim in _proto_fields(v):
                if n == 2:
                    size = [s for k, s in _proto_fields(dim) if k == 1]
                    dims.append(_signed64(size[-1]) if size else 0)
                elif n == 3 and dim:
                    raise ValueError("tensor of unknown rank")
            entry["shape"] = tuple(dims)
        elif number == 3:
            entry["shard_id"] = v
        elif number == 4:
            entry["offset"] = _signed64(v)
        elif number == 5:
            entry["size"] = _signed64(v)
        elif number == 6:
            entry["crc32c"] = v
        elif number == 7:
            entry["sliced"] = True
    return entry


def _encode_entry(dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int) -> bytes:
    out = bytearray()
    # Proto3 leaves default (zero) values out, as TensorFlow does.
    _put_varint(out, 1 << 3)
    _put_varint(out, dtype)
    shape_msg = bytearray()
    for d in shape:
        dim = bytearray()
        if d:
            _put_varint(dim, 1 << 3)
            _put_varint(dim, d)
        _put_varint(shape_msg, 2 << 3 | 2)
        _put_varint(shape_msg, len(dim))
        shape_msg += dim
    _put_varint(out, 2 << 3 | 2)
    _put_varint(out, len(shape_msg))
    out += shape_msg
    for number, v in ((4, offset), (5, size)):
        if v:
            _put_varint(out, number << 3)
            _put_varint(out, v)
    out += struct.pack("<BI", 6 << 3 | 5, _mask(crc))
    return bytes(out)


def _encode_header(num_shards: int) -> bytes:
    # BundleHeaderProto {num_shards = 1; endianness = 2 (LITTLE = 0); version = 3 {producer = 1}}
    out = bytearray()
    _put_varint(out, 1 << 3)
    _put_varint(out, num_shards)
    out += bytes([3 << 3 | 2, 2, 1 << 3, 1])
    return bytes(out)


# --- SSTable (LevelDB table) ----------------------------------------------------------------

def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Decode one table block's prefix-compressed (key, value) entries."""
    if len(block) < 4:
        raise ValueError("block too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 * (num_restarts + 1)
    if end < 0:
        raise ValueError("bad restart count")
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos, end)
        non_shared, pos = _varint(block, pos, end)
        value_len, pos = _varint(block, pos, end)
        if shared > len(key) or pos + non_shared + value_len > end:
            raise ValueError("entry runs past the block")
        key = key[:shared] + bytes(block[pos:pos + non_shared])
        pos += non_shared
        entries.append((key, bytes(block[pos:pos + value_len])))
        pos += value_len
    return entries


def _read_table(path: Path) -> list[tuple[bytes, bytes]]:
    try:
        buf = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint index not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read checkpoint index ({e.strerror})") from None
    if len(buf) < FOOTER_SIZE:
        raise UserError(f"{path}: truncated checkpoint index ({len(buf)} bytes, shorter than "
                        f"the {FOOTER_SIZE}-byte footer)")
    footer = buf[-FOOTER_SIZE:]
    if struct.unpack_from("<Q", footer, 40)[0] != TABLE_MAGIC:
        raise UserError(f"{path}: not a TensorFlow checkpoint index (bad magic number; "
                        "truncated, or another kind of file)")
    try:
        _, pos = _varint(footer, 0, 40)  # metaindex handle: TF writes no meta blocks we need
        _, pos = _varint(footer, pos, 40)
        index_offset, pos = _varint(footer, pos, 40)
        index_size, pos = _varint(footer, pos, 40)
    except ValueError:
        raise UserError(f"{path}: corrupt checkpoint index (bad footer)") from None
    limit = len(buf) - FOOTER_SIZE
    entries = []
    try:
        for _, handle in _block_entries(_block(buf, index_offset, index_size, limit, path, "index")):
            offset, pos = _varint(handle, 0, len(handle))
            size, pos = _varint(handle, pos, len(handle))
            entries += _block_entries(_block(buf, offset, size, limit, path, "data"))
    except ValueError as e:
        raise UserError(f"{path}: corrupt checkpoint index ({e})") from None
    return entries


def _block(buf: bytes, offset: int, size: int, limit: int, path: Path, what: str) -> bytes:
    if offset + size + BLOCK_TRAILER_SIZE > limit:
        raise UserError(f"{path}: truncated or corrupt checkpoint index ({what} block at "
                        f"{offset}+{size} runs past the end of the table)")
    kind, masked = struct.unpack_from("<BI", buf, offset + size)
    if crc32c(buf[offset:offset + size + 1]) != _unmask(masked):
        raise UserError(f"{path}: corrupt checkpoint index ({what} block checksum mismatch)")
    if kind == 1:
        raise UserError(f"{path}: snappy-compressed checkpoint index is not supported "
                        "(TensorFlow writes uncompressed ones; re-save it with TensorFlow)")
    if kind != 0:
        raise UserError(f"{path}: corrupt checkpoint index (unknown block compression {kind})")
    return buf[offset:offset + size]


def _separator(start: bytes, limit: bytes) -> bytes:
    """A short key k with start <= k < limit (LevelDB's FindShortestSeparator)."""
    n = 0
    while n < min(len(start), len(limit)) and start[n] == limit[n]:
        n += 1
    if n < min(len(start), len(limit)) and start[n] < 0xFF and start[n] + 1 < limit[n]:
        return start[:n] + bytes([start[n] + 1])
    return start


def _successor(key: bytes) -> bytes:
    """A short key >= key (LevelDB's FindShortSuccessor)."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


class _TableWriter:
    """Builds an uncompressed LevelDB table the way TensorFlow's BundleWriter does, so that
    our index files come out byte-identical to TensorFlow's for the same tensors."""

    def __init__(self, block_size: int = 262144, restart_interval: int = 16):
        self.block_size, self.restart_interval = block_size, restart_interval
        self.out = bytearray()
        self.index: list[list] = []  # [key, handle] per finished block
        self.pending = False  # the last index key still waits for the next block's first key
        self._reset()

    def _reset(self) -> None:
        self.block, self.restarts, self.count, self.last_key = bytearray(), [0], 0, b""

    def add(self, key: bytes, value: bytes) -> None:
        if self.pending:
            # Index keys only need to separate blocks; shorter ones keep the index small.
            self.index[-1][0] = _separator(self.index[-1][0], key)
            self.pending = False
        shared = 0
        if self.count % self.restart_interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        elif self.count:
            self.restarts.append(len(self.block))
        for v in (shared, len(key) - shared, len(value)):
            _put_varint(self.block, v)
        self.block += key[shared:] + value
        self.count += 1
        self.last_key = key
        if len(self.block) + 4 * len(self.restarts) + 4 >= self.block_size:
            self._flush()

    def _finish_block(self, block: bytearray, restarts: list[int]) -> bytes:
        """Append a block and its trailer; return its encoded handle."""
        block += struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))
        handle = bytearray()
        _put_varint(handle, len(self.out))
        _put_varint(handle, len(block))
        trailer = bytes([0])  # no compression
        self.out += block + trailer + struct.pack("<I", _mask(crc32c(bytes(block) + trailer)))
        return bytes(handle)

    def _flush(self) -> None:
        if self.count:
            self.index.append([self.last_key, self._finish_block(self.block, self.restarts)])
            self.pending = True
            self._reset()

    def finish(self) -> bytes:
        self._flush()
        if self.pending:
            self.index[-1][0] = _successor(self.index[-1][0])
        meta = self._finish_block(bytearray(), [0])
        index = _TableWriter(block_size=1 << 62, restart_interval=1)
        for key, handle in self.index:
            index.add(key, handle)
        index_handle = self._finish_block(index.block, index.restarts)
        footer = (meta + index_handle).ljust(40, b"\0") + struct.pack("<Q", TABLE_MAGIC)
        return bytes(self.out + footer)


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
    for key, value in _read_table(index):
        try:
            if key == b"":
                for number, v in _proto_fields(value):
                    if number == 1:
                        header["num_shards"] = v
                    elif number == 2:
                        header["endianness"] = v
                continue
            entries[key.decode("utf-8")] = _parse_entry(value)
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
        check = _native_crc32c()
    elif verify:
        check = _native_crc32c() or crc32c
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
        if check is not None and e["crc32c"] is not None and check(raw) != _unmask(e["crc32c"]):
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

def _write_temp(path: Path, parts) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_tf_checkpoint(prefix: str | os.PathLike, tensors: dict[str, np.ndarray],
                        update_state_file: bool = True) -> Path:
    """Save ``tensors`` as ``<prefix>.index`` + ``<prefix>.data-00000-of-00001``; return prefix.

    TensorFlow's ``Saver.restore`` and ``tf.train.load_checkpoint`` read the result (checked
    with TF 2.21). Every file is first written in full under a temporary name, then renamed
    into place, data first. With ``update_state_file`` the directory's ``checkpoint`` file
    is pointed at this prefix. No ``.meta`` graph is written: nothing here needs one.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    table = _TableWriter(block_size=_BLOCK_SIZE)
    table.add(b"", _encode_header(1))
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
                  _encode_entry(NUMPY_TO_DT[dtype], array.shape, offset, raw.nbytes, crc32c(raw)))
        parts.append(raw)
        offset += raw.nbytes
    files = [(_data_path(prefix, 0, 1), parts), (_index_path(prefix), [table.finish()])]
    if update_state_file:
        state = (f'model_checkpoint_path: "{prefix.name}"\n'
                 f'all_model_checkpoint_paths: "{prefix.name}"\n')
        files.append((prefix.parent / "checkpoint", [state.encode("utf-8")]))
    temps = []
    try:
        for path, content in files:
            temps.append(_write_temp(path, content))
        for (path, _), tmp in zip(files, temps):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return prefix
