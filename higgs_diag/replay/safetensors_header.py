"""Read a .safetensors header without torch: tensor names, dtypes, shapes; a truncated or foreign file is an
error naming the file. (The format: 8-byte little-endian header length, a JSON header, then the data.)"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import ReplayError

MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """``({name: {"dtype", "shape", "data_offsets"}}, metadata)``. Raises ReplayError for anything that is not
    a complete safetensors file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ReplayError(f"{p}: not a safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise ReplayError(f"{p}: not a safetensors file, or truncated (header of {n} bytes in a file of "
                                  f"{size} bytes)")
            raw = fh.read(n)
    except OSError as e:
        raise ReplayError(f"{p}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ReplayError(f"{p}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ReplayError(f"{p}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        if not (isinstance(info, dict) and "shape" in info and "data_offsets" in info):
            raise ReplayError(f"{p}: not a safetensors file (entry {name!r} has no shape/data_offsets)")
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise ReplayError(f"{p}: truncated: the header describes {8 + n + end} bytes, the file has {size}")
    return header, meta if isinstance(meta, dict) else {}
