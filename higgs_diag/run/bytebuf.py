"""The padded byte buffer the event file reader works on, and gathers from it.

A file's bytes sit in a uint8 array between FRONT zero bytes and BACK zero bytes, so that fixed-width
windows can be gathered at any record position without bounds checks: CRC blocks reach up to 1 KiB + 64
bytes before a payload's end, 4- and 8-byte reads near the end of the file run past it.
"""
from __future__ import annotations

import numpy as np

FRONT = 1088  # zero bytes before the file's bytes in the buffer (>= the largest CRC block, 1024 + 64)
BACK = 64  # zero bytes after it (window gathers near the end)


def padded(data) -> np.ndarray:
    """A new buffer holding ``data`` (bytes-like or array) at FRONT, zeros around it."""
    a = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
    buf = np.zeros(FRONT + a.size + BACK, dtype=np.uint8)
    buf[FRONT:FRONT + a.size] = a
    return buf


def rows(buf: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """(len(pos), width) uint8: the ``width`` bytes of ``buf`` at every position (one memcpy per row,
    through a stride-1 view with a ``width``-byte void dtype: much faster than a 2-D fancy index)."""
    v = np.ndarray(shape=(buf.size - width + 1,), dtype=f"V{width}", buffer=buf, strides=(1,))
    return v[pos].view(np.uint8).reshape(-1, width)


def u32_at(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The little-endian uint32 at every position."""
    return rows(buf, pos, 4).view("<u4").reshape(-1)


def u64_at(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The little-endian uint64 at every position."""
    return rows(buf, pos, 8).view("<u8").reshape(-1)
