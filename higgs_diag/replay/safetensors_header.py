"""Read a .safetensors header without torch: tensor names, dtypes, shapes; a truncated or foreign file is an
error naming the file. (The format: 8-byte little-endian header length, a JSON header, then the data.)

Within ``higgs_diag.limits``: only a regular file is opened (a FIFO or device is refused without blocking), the
header is at most ``MAX_SAFETENSORS_HEADER_BYTES`` and ``MAX_JSON_DEPTH`` deep, and every entry must have a
dtype, a shape of non-negative integers and two integer ``data_offsets`` inside the file."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .. import limits
from ..run.trainer_state import JSONLimitError, loads_bounded
from .errors import ReplayError

MAX_HEADER = limits.MAX_SAFETENSORS_HEADER_BYTES


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """``({name: {"dtype", "shape", "data_offsets"}}, metadata)``. Raises ReplayError for anything that is not
    a complete safetensors file."""
    p = Path(path)
    try:
        fh, size = limits.open_regular(p, what="safetensors file")
        with fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ReplayError(f"{p}: not a safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise ReplayError(f"{p}: not a safetensors file, or truncated (header of {n} bytes in a file of "
                                  f"{size} bytes)")
            parts, got = [], 0  # n is within the file and MAX_HEADER: read in bounded pieces all the same
            while got < n:
                part = fh.read(min(limits.READ_CHUNK_BYTES, n - got))
                if not part:
                    break
                parts.append(part)
                got += len(part)
            raw = b"".join(parts)
    except limits.NotReadable as e:
        raise ReplayError(f"{p}: {e}") from None
    except OSError as e:
        raise ReplayError(f"{p}: cannot be read ({e.strerror or e})") from None
    try:
        header = loads_bounded(raw.decode("utf-8"), raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ReplayError(f"{p}: not a safetensors file (its header is not JSON)") from None
    except JSONLimitError as e:
        raise ReplayError(f"{p}: not a safetensors file (its header is {e.msg})") from None
    if not isinstance(header, dict):
        raise ReplayError(f"{p}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        if not (isinstance(info, dict) and "shape" in info and "data_offsets" in info):
            raise ReplayError(f"{p}: not a safetensors file (entry {name!r:.80} has no shape/data_offsets)")
        offsets, shape = info["data_offsets"], info["shape"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ReplayError(f"{p}: not a safetensors file (entry {name!r:.80} has data_offsets "
                              f"{json.dumps(offsets, default=repr)[:80]}, not two increasing integers)")
        if not (isinstance(shape, list) and all(_is_int(d) and 0 <= d <= limits.MAX_STEP for d in shape)):
            raise ReplayError(f"{p}: not a safetensors file (entry {name!r:.80} has shape "
                              f"{json.dumps(shape, default=repr)[:80]}, not a list of sizes)")
        if not isinstance(info.get("dtype"), str):
            raise ReplayError(f"{p}: not a safetensors file (entry {name!r:.80} has no dtype)")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise ReplayError(f"{p}: truncated: the header describes {8 + n + end} bytes, the file has {size}")
    return header, meta if isinstance(meta, dict) else {}
