"""TensorFlow's on-disk building blocks, with numpy alone: the protobuf wire format of a
checkpoint's BundleEntryProto / BundleHeaderProto, and the LevelDB-style SSTable that holds them.

    entries = read_table(Path("model.ckpt.index"))     # [(key, value bytes)], keys sorted
    table = TableWriter(); table.add(b"", encode_header(1)); data = table.finish()
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import UserError
from .checksums import crc32c, mask, unmask

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
BLOCK_SIZE = 262144  # TensorFlow's table block size; tests shrink it to get many blocks


# --- varints and protobuf wire format -------------------------------------------------------

def varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
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


def put_varint(out: bytearray, value: int) -> None:
    value &= (1 << 64) - 1  # negative int64 values take ten bytes, as in protobuf
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into (field number, value) pairs; unknown fields are kept."""
    fields, pos, end = [], 0, len(buf)
    while pos < end:
        tag, pos = varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = varint(buf, pos, end)
        elif wire == 1:
            if pos + 8 > end:
                raise ValueError("truncated fixed64")
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            size, pos = varint(buf, pos, end)
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


def signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_entry(value: bytes) -> dict:
    """BundleEntryProto -> {dtype, shape, shard_id, offset, size, crc32c, sliced}."""
    entry = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": None,
             "sliced": False}
    for number, v in proto_fields(value):
        if number == 1:
            entry["dtype"] = v
        elif number == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
            dims = []
            for n, dim in proto_fields(v):
                if n == 2:
                    size = [s for k, s in proto_fields(dim) if k == 1]
                    dims.append(signed64(size[-1]) if size else 0)
                elif n == 3 and dim:
                    raise ValueError("tensor of unknown rank")
            entry["shape"] = tuple(dims)
        elif number == 3:
            entry["shard_id"] = v
        elif number == 4:
            entry["offset"] = signed64(v)
        elif number == 5:
            entry["size"] = signed64(v)
        elif number == 6:
            entry["crc32c"] = v
        elif number == 7:
            entry["sliced"] = True
    return entry


def encode_entry(dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int) -> bytes:
    out = bytearray()
    # Proto3 leaves default (zero) values out, as TensorFlow does.
    put_varint(out, 1 << 3)
    put_varint(out, dtype)
    shape_msg = bytearray()
    for d in shape:
        dim = bytearray()
        if d:
            put_varint(dim, 1 << 3)
            put_varint(dim, d)
        put_varint(shape_msg, 2 << 3 | 2)
        put_varint(shape_msg, len(dim))
        shape_msg += dim
    put_varint(out, 2 << 3 | 2)
    put_varint(out, len(shape_msg))
    out += shape_msg
    for number, v in ((4, offset), (5, size)):
        if v:
            put_varint(out, number << 3)
            put_varint(out, v)
    out += struct.pack("<BI", 6 << 3 | 5, mask(crc))
    return bytes(out)


def encode_header(num_shards: int) -> bytes:
    # BundleHeaderProto {num_shards = 1; endianness = 2 (LITTLE = 0); version = 3 {producer = 1}}
    out = bytearray()
    put_varint(out, 1 << 3)
    put_varint(out, num_shards)
    out += bytes([3 << 3 | 2, 2, 1 << 3, 1])
    return bytes(out)


# --- SSTable (LevelDB table) ----------------------------------------------------------------

def block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Decode one table block's prefix-compressed (key, value) entries."""
    if len(block) < 4:
        raise ValueError("block too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 * (num_restarts + 1)
    if end < 0:
        raise ValueError("bad restart count")
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = varint(block, pos, end)
        non_shared, pos = varint(block, pos, end)
        value_len, pos = varint(block, pos, end)
        if shared > len(key) or pos + non_shared + value_len > end:
            raise ValueError("entry runs past the block")
        key = key[:shared] + bytes(block[pos:pos + non_shared])
        pos += non_shared
        entries.append((key, bytes(block[pos:pos + value_len])))
        pos += value_len
    return entries


def read_table(path: Path) -> list[tuple[bytes, bytes]]:
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
        _, pos = varint(footer, 0, 40)  # metaindex handle: TF writes no meta blocks we need
        _, pos = varint(footer, pos, 40)
        index_offset, pos = varint(footer, pos, 40)
        index_size, pos = varint(footer, pos, 40)
    except ValueError:
        raise UserError(f"{path}: corrupt checkpoint index (bad footer)") from None
    limit = len(buf) - FOOTER_SIZE
    entries = []
    try:
        for _, handle in block_entries(block(buf, index_offset, index_size, limit, path, "index")):
            offset, pos = varint(handle, 0, len(handle))
            size, pos = varint(handle, pos, len(handle))
            entries += block_entries(block(buf, offset, size, limit, path, "data"))
    except ValueError as e:
        raise UserError(f"{path}: corrupt checkpoint index ({e})") from None
    return entries


def block(buf: bytes, offset: int, size: int, limit: int, path: Path, what: str) -> bytes:
    if offset + size + BLOCK_TRAILER_SIZE > limit:
        raise UserError(f"{path}: truncated or corrupt checkpoint index ({what} block at "
                        f"{offset}+{size} runs past the end of the table)")
    kind, masked = struct.unpack_from("<BI", buf, offset + size)
    if crc32c(buf[offset:offset + size + 1]) != unmask(masked):
        raise UserError(f"{path}: corrupt checkpoint index ({what} block checksum mismatch)")
    if kind == 1:
        raise UserError(f"{path}: snappy-compressed checkpoint index is not supported "
                        "(TensorFlow writes uncompressed ones; re-save it with TensorFlow)")
    if kind != 0:
        raise UserError(f"{path}: corrupt checkpoint index (unknown block compression {kind})")
    return buf[offset:offset + size]


def separator(start: bytes, limit: bytes) -> bytes:
    """A short key k with start <= k < limit (LevelDB's FindShortestSeparator)."""
    n = 0
    while n < min(len(start), len(limit)) and start[n] == limit[n]:
        n += 1
    if n < min(len(start), len(limit)) and start[n] < 0xFF and start[n] + 1 < limit[n]:
        return start[:n] + bytes([start[n] + 1])
    return start


def successor(key: bytes) -> bytes:
    """A short key >= key (LevelDB's FindShortSuccessor)."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


class TableWriter:
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
            self.index[-1][0] = separator(self.index[-1][0], key)
            self.pending = False
        shared = 0
        if self.count % self.restart_interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        elif self.count:
            self.restarts.append(len(self.block))
        for v in (shared, len(key) - shared, len(value)):
            put_varint(self.block, v)
        self.block += key[shared:] + value
        self.count += 1
        self.last_key = key
        if len(self.block) + 4 * len(self.restarts) + 4 >= self.block_size:
            self._flush()

    def _finish_block(self, block: bytearray, restarts: list[int]) -> bytes:
        """Append a block and its trailer; return its encoded handle."""
        block += struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))
        handle = bytearray()
        put_varint(handle, len(self.out))
        put_varint(handle, len(block))
        trailer = bytes([0])  # no compression
        self.out += block + trailer + struct.pack("<I", mask(crc32c(bytes(block) + trailer)))
        return bytes(handle)

    def _flush(self) -> None:
        if self.count:
            self.index.append([self.last_key, self._finish_block(self.block, self.restarts)])
            self.pending = True
            self._reset()

    def finish(self) -> bytes:
        self._flush()
        if self.pending:
            self.index[-1][0] = successor(self.index[-1][0])
        meta = self._finish_block(bytearray(), [0])
        index = TableWriter(block_size=1 << 62, restart_interval=1)
        for key, handle in self.index:
            index.add(key, handle)
        index_handle = self._finish_block(index.block, index.restarts)
        footer = (meta + index_handle).ljust(40, b"\0") + struct.pack("<Q", TABLE_MAGIC)
        return bytes(self.out + footer)
