"""What a checkpoint folder says about its weights without loading them: the dtype they are stored in, from
``config.json``'s ``torch_dtype`` or, when that is missing, the dtype of most tensors in the safetensors headers
(read as JSON; the data are never touched). Standard library only."""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

from ..layout import ADAPTER_WEIGHTS, MODEL_CONFIG, SAFETENSORS_INDEX, SAFETENSORS_WEIGHTS

MAX_HEADER_BYTES = 16 * 1024 * 1024  # a safetensors header larger than this is not read
MAX_CONFIG_BYTES = 1024 * 1024
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _config_dtype(folder: Path) -> str | None:
    p = folder / MODEL_CONFIG
    try:
        if not p.is_file() or p.stat().st_size > MAX_CONFIG_BYTES:
            return None
        v = json.loads(p.read_text(encoding="utf-8")).get("torch_dtype")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return v if isinstance(v, str) and v else None


def _header_dtype(path: Path) -> str | None:
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                return None
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    counts = Counter(str(v.get("dtype")) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))
    if not counts:
        return None
    top = counts.most_common(1)[0][0]
    return _SAFETENSORS_DTYPES.get(top, top.lower())


def _weight_files(folder: Path) -> list[Path]:
    """The full model's weights (the first shard of an index), else an adapter's."""
    index = folder / SAFETENSORS_INDEX
    try:
        if index.is_file() and index.stat().st_size <= MAX_CONFIG_BYTES * 16:
            wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            first = next(iter(sorted(set(wm.values()))), None) if isinstance(wm, dict) else None
            if isinstance(first, str) and Path(first).name == first:
                return [folder / first]
    except (OSError, ValueError, AttributeError, RecursionError):
        pass
    return [folder / SAFETENSORS_WEIGHTS, folder / ADAPTER_WEIGHTS]


def weights_dtype(folder: str | Path) -> tuple[str | None, str | None]:
    """(dtype, where it was read) for a checkpoint folder: the safetensors weights' own dtype first (what is
    really stored), else ``config.json``'s ``torch_dtype``."""
    folder = Path(folder)
    for f in _weight_files(folder):
        dt = _header_dtype(f)
        if dt:
            return dt, f"{f} (safetensors header)"
    dt = _config_dtype(folder)
    return (dt, f"{folder / MODEL_CONFIG} torch_dtype") if dt else (None, None)
