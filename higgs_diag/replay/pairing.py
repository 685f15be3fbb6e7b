"""Which checkpoint replays which batch.

A logged loss can only be compared with a recomputed one through the weights that produced it, so a batch is
replayed through the checkpoint nearest its training step (the same step first, then the nearest, the earlier on
a tie); with ``all_checkpoints`` through every checkpoint. Whether a logged value is then comparable is the
rules' decision (``higgs_diag.checks._replay_util.pairing``); this module only chooses.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ..batch import BatchError, load_batch
from ..config import ReplayOptions
from .batches import STEP_RE, batch_step
from .checkpoint import inspect_checkpoint
from .errors import ReplayError


def peek_step(path: Path) -> int | None:
    """A batch file's step from its name (``step-000070.pt``), else from its dump meta (one read)."""
    m = STEP_RE.search(path.stem)
    if m:
        return int(m.group(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, meta = load_batch(path)
    except BatchError:
        return None  # the replay reports the file properly when it loads it
    return batch_step(meta, path)[0]


def loadable_checkpoints(run, run_dir: Path, options: ReplayOptions) -> tuple[list[tuple[int | None, Path]], list[str]]:
    """The run's checkpoints that can be loaded, ``(step, path)`` by step (the output_dir's own final save last
    when it is loadable and nothing else is), and the reasons the others cannot."""
    cands = [Path(c.path) for c in sorted(run.checkpoints, key=lambda c: (c.step is None, c.step or 0))] \
        if run is not None else []
    found, reasons = [], []
    for c in cands:
        try:
            insp = inspect_checkpoint(c, base=options.base, run_root=run_dir, lora_alpha=options.lora_alpha)
            found.append((insp.source.step, c))
        except ReplayError as e:
            reasons.append(str(e))
    if not found:
        try:
            insp = inspect_checkpoint(run_dir, base=options.base, run_root=run_dir, lora_alpha=options.lora_alpha)
            found.append((insp.source.step, run_dir))
        except ReplayError as e:
            reasons.append(str(e))
    return found, reasons


def nearest(step: int | None, checkpoints: list[tuple[int | None, Path]]) -> Path:
    """The checkpoint for a batch of ``step``: the same step, else the nearest (the earlier on a tie); the latest
    when the batch's step is unknown."""
    with_step = [(s, p) for s, p in checkpoints if s is not None]
    if step is None or not with_step:
        return (with_step or checkpoints)[-1][1]
    return min(with_step, key=lambda sp: (abs(sp[0] - step), sp[0] > step))[1]


def assign(files: list[Path], checkpoints: list[tuple[int | None, Path]], *, all_checkpoints: bool = False,
           step_override: int | None = None) -> dict[Path, list[Path]]:
    """``{checkpoint: [batch files]}`` in checkpoint order."""
    groups: dict[Path, list[Path]] = {p: [] for _, p in checkpoints}
    for f in files:
        if all_checkpoints:
            for _, p in checkpoints:
                groups[p].append(f)
        else:
            groups[nearest(step_override if step_override is not None else peek_step(f), checkpoints)].append(f)
    return {p: fs for p, fs in groups.items() if fs}
