"""Batch files for the replay: finding them, loading one at a time (weights-only), the trainer's validation.

A batch the model cannot run (tensors of the wrong kind or shape, ids out of range, segment starts that do
not fit, a different codebook count) stops the replay with a one-line error naming the file and the field.
Everything else the validation finds (missing audio fields, labels equal to inputs, masked labels, delay
pattern) is evidence for the findings.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

from ..batch import (BatchError, BatchSpec, META_KEY, batch_stats, finite_or_none, load_batch, target_leaks,
                     validate_batch)
from .errors import ReplayError
from ..evidence import BatchRecord

BATCH_SUFFIXES = (".pt", ".pth", ".safetensors")
# validate_batch kinds that make a batch unusable for a forward pass
STRUCTURAL = ("bad-tensor", "shape-mismatch", "bad-starts", "label-range", "id-range", "segment-count",
              "codebook-count")
STEP_RE = re.compile(r"step[-_]?(\d+)")


def find_batch_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expand to their ``*.pt``, ``*.pth`` and ``*.safetensors`` files, by name."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            try:
                files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in BATCH_SUFFIXES
                               and not f.name.endswith(".tmp"))
            except OSError as e:
                raise ReplayError(f"{p}: cannot list this batches folder ({e.strerror or e})") from None
            if not files:
                raise ReplayError(f"{p}: no batch files (*.pt, *.pth, *.safetensors) in this folder")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise ReplayError(f"{p}: no such batch file or folder")
    seen: set[Path] = set()
    unique = []
    for f in out:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _meta_losses(meta: dict[str, Any]) -> dict[str, float]:
    losses = meta.get("losses")
    src = losses if isinstance(losses, dict) else meta
    out = {}
    for k, v in src.items():
        if isinstance(k, str) and (k == "loss" or k.endswith("_loss") or k.startswith(("audio_loss", "text_loss"))):
            f = finite_or_none(v) if not isinstance(v, bool) else None
            if f is not None or (isinstance(v, float)):
                out[k] = float(v)
    return out


def batch_step(meta: dict[str, Any], path: Path) -> tuple[int | None, str | None]:
    """The training step a batch was used at, and where that came from: its dump's meta (``step`` /
    ``global_step``), else a ``step-N`` / ``stepN`` in its file name."""
    s = meta.get("step", meta.get("global_step"))
    if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and abs(s) < 2 ** 62:
        return int(s), "meta"
    m = STEP_RE.search(path.stem)
    return (int(m.group(1)), "file name") if m else (None, None)


def load_checked(path: Path, spec: BatchSpec, max_masked_share: float, step: int | None = None):
    """Load one batch file and run the batch checks. Returns (tensors, BatchRecord). ``step`` overrides the
    batch's own step (``--batch-step``)."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error says it all
            warnings.simplefilter("ignore")
            tensors, meta = load_batch(path)
    except BatchError as e:
        raise ReplayError(str(e)) from None
    if "input_ids" not in tensors:
        raise ReplayError(f"{path}: holds no input_ids (keys: {', '.join(sorted(tensors))}): a Higgs Audio batch "
                          f"needs the fields of HiggsAudioBatchInput")
    issues = validate_batch(tensors, spec, max_masked_share=max_masked_share)
    for i in issues:
        if i.kind in STRUCTURAL:
            raise ReplayError(f"{path}: {i.field}: {i.message}; the model cannot run this batch")
    stats = dataclasses.asdict(batch_stats(tensors, spec))
    stats["target_leaks"] = [list(h) for h in target_leaks(tensors, spec)]
    plain_meta = {k: v for k, v in meta.items() if k != META_KEY}
    found, step_from = batch_step(meta, path)
    if step is not None:
        found, step_from = step, "--batch-step"
    rec = BatchRecord(
        path=str(path), step=found, step_from=step_from, keys=sorted(tensors),
        shapes={k: list(v.shape) for k, v in tensors.items()}, meta=plain_meta,
        stats=stats, issues=[dataclasses.asdict(i) for i in issues],
    )
    rec.meta["losses"] = _meta_losses(meta)
    return tensors, rec
