"""The losses the training logged for a replayed batch: from the dump itself, else from the run's logs.

Priority: the batch dump's own ``losses`` (computed on that very batch); the run's log entry covering the
dump's step (with ``logging_steps=1``, that batch's loss); the last entry at or before the checkpoint's step.
No torch here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..layout import EVENT_FILE_MARK, LOGGING_DIR, LORA_ADAPTERS_DIR, TRAINER_STATE, has_checkpoint_folders, \
    is_checkpoint_name
from ..evidence import BatchRecord, LoggedLosses


def loss_metrics(run) -> list[str]:
    return [m for m in run.metrics
            if m in ("loss", "audio_loss", "text_loss") or m.startswith(("audio_loss_cb", "text_loss_"))]


def find_run_root(checkpoint: Path) -> Path | None:
    """The output_dir a checkpoint belongs to: its parent for ``checkpoint-N``/``last-checkpoint`` (grandparent
    for ``checkpoint-N/lora_adapters``), or the folder itself when it holds the logs (a final save)."""
    p = checkpoint if checkpoint.is_dir() else checkpoint.parent
    p = p.resolve()
    if p.name == LORA_ADAPTERS_DIR:
        p = p.parent
    cands = []
    if is_checkpoint_name(p.name):
        cands.append(p.parent)
    cands.append(p)
    for c in cands:
        if (c / LOGGING_DIR).is_dir() or (c / TRAINER_STATE).is_file() or any(c.glob(EVENT_FILE_MARK + "*")) \
                or has_checkpoint_folders(c):
            return c
    return None


def _pick(series, step: int, logging_steps: int, at_or_before: bool):
    idx = series.index.to_numpy()
    if not len(idx):
        return None
    if at_or_before:
        ok = np.nonzero(idx <= step)[0]
        return int(ok[-1]) if len(ok) else None
    ok = np.nonzero((idx >= step) & (idx < step + max(logging_steps, 1)))[0]
    return int(ok[0]) if len(ok) else None


def logged_for(rec: BatchRecord, run, checkpoint_step: int | None) -> LoggedLosses | None:
    losses = rec.meta.get("losses") or {}
    if losses:
        return LoggedLosses(source="batch dump", step=rec.step, values=dict(losses), exact=True, file=rec.path)
    if run is None:
        return None
    step, exact = (rec.step, True) if rec.step is not None else (checkpoint_step, False)
    if step is None:
        return None
    ls = (run.state.logging_steps if run.state and run.state.logging_steps else None) or run.arg("logging_steps") or 1
    try:
        ls = int(ls)
    except (TypeError, ValueError):
        ls = 1
    values, at = {}, None
    for m in loss_metrics(run):
        s = run.series(m)
        i = _pick(s, step, ls, at_or_before=not exact)
        if i is None:
            continue
        v = float(s.iloc[i])
        values[m] = v
        at = int(s.index[i]) if at is None else at
    if not values:
        return None
    src, file = _source_of(run, next(iter(values)))
    return LoggedLosses(source=f"run logs ({src})", step=at, values=values, exact=exact and ls == 1 and at == step,
                        file=file)


_SOURCE_NAMES = {"trainer_state": "trainer_state.json", "tensorboard": "TensorBoard", "console": "console log"}


def _source_of(run, metric: str) -> tuple[str, str | None]:
    """Which source (and file) ``run.series(metric)`` reads: trainer_state.json, TensorBoard or the console."""
    from ..run.model import pick_source

    df = run.scalars
    sub = df[df["metric"] == metric]
    if sub.empty:
        return "logs", None
    counts = sub.groupby("source", observed=True)["step"].size()
    src = pick_source(counts[counts > 0])
    files = sub.loc[sub["source"] == src, "file"]
    return _SOURCE_NAMES.get(str(src), str(src)), (str(files.iloc[-1]) if len(files) else None)
