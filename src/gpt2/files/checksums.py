"""Checksums: a file's sha256 (downloads are checked against the published one), and CRC-32C
(Castagnoli) as TensorFlow checksums checkpoint tensors, vectorised with numpy.

    sha256_of("data/hellaswag_val.jsonl")   # hex digest, read in 1 MiB blocks
    crc32c(b"123456789")                    # 0xE3069283
    mask(crc) / unmask(masked)              # the rotated form TensorFlow stores
"""

from __future__ import annotations

import hashlib
import os

import numpy as np


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def native_crc32c():
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
