"""Did the weights move? Fingerprints of a checkpoint's trainable tensors, read as raw bytes from its
safetensors files (no torch, nothing unpickled): a digest to compare checkpoints with, and whether every LoRA
B matrix is still all zero (its initial value: an adapter that never received an update).

LoRA tensors (adapters, wrapper state dicts with LoRA keys) are read whole; the tensors of a full model are
sampled (the first ``SAMPLE_BYTES`` of each), which tells two checkpoints of a run apart after any update while
reading a few MB of a multi-GB model.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from ..evidence import WeightsRecord
from .checkpoint import Inspection
from .safetensors_header import read_header

SAMPLE_BYTES = 64 * 1024


def _files_of(insp: Inspection) -> list[Path]:
    return sorted({f for f, _shape, _dtype in insp.tensors.values()})


def fingerprint(insp: Inspection) -> WeightsRecord | None:
    """The fingerprint of the checkpoint's own tensors (an adapter's, or the full model's), or None when it has
    no safetensors weights."""
    files = _files_of(insp)
    if not files:
        return None
    lora_only = insp.source.kind in ("adapter", "wrapper-lora")
    h = hashlib.sha256()
    n = n_b = n_b_zero = 0
    sampled = False
    for f in files:
        header, _ = read_header(f)
        with open(f, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            base = 8 + hlen
            for name in sorted(header):
                if lora_only and "lora_" not in name:
                    continue
                a, b = (int(x) for x in header[name]["data_offsets"])
                size = b - a
                read = size if lora_only else min(size, SAMPLE_BYTES)
                sampled |= read < size
                fh.seek(base + a)
                raw = fh.read(read)
                h.update(name.encode() + b"\0" + raw)
                n += 1
                if "lora_B" in name or "lora_embedding_B" in name:
                    n_b += 1
                    n_b_zero += not raw.strip(b"\0")
    return WeightsRecord(checkpoint=insp.source.path, step=insp.source.step, kind=insp.source.kind,
                         digest=h.hexdigest(), n_tensors=n, sampled=sampled, lora_b_tensors=n_b,
                         lora_b_zero=n_b_zero)
