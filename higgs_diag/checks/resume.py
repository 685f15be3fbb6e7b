"""Discontinuities in the logs: a resumed run re-logging steps (HD701), epoch resets (HD703), stretches with
no log (HD704), and two runs sharing one folder (HD705).

Everything here is linear (or n log n) in the number of logged points, however often the steps go back:
a log whose steps go back at every other entry still reads in one pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import Thresholds
from ..diagnosis import Finding, Severity
from ..run.model import Run
from . import causes, check, finding
from ._util import finite, fmt

_LIST = 6  # restart points / resets / gaps listed as evidence


@dataclass(frozen=True)
class _Restart:
    """A place where the logged steps go back: in one file (``where`` is the file) or from one event file to
    the next of the same source (``a -> b``)."""

    where: str
    metric: str
    before: int  # the highest step logged before it
    after: int  # the first (lowest) step of the new session
    relogged: int  # points of the new session at steps an earlier session had logged
    from_scratch: bool  # the new session starts at or before the first step of the earlier ones

    def line(self) -> str:
        return (f"{self.where}: {self.metric} steps go back from {self.before} to {self.after}"
                + (f" ({self.relogged} logged step(s) logged again)" if self.relogged else "")
                + ("; it starts over: a new run in the same logging dir" if self.from_scratch else "; a resume"))


def _session_restarts(where: str, metric: str, steps: np.ndarray, segs: np.ndarray) -> list[_Restart]:
    """The restarts of one file's sequence of ``steps`` (in reading order), split into sessions by ``segs``
    (the reader's segment numbers; without them, +1 wherever the step goes back). Session k is compared
    with every session numbered below it, all in O(n log n)."""
    if len(steps) == 0:
        return []
    if not segs.any():
        back = np.diff(steps) < 0
        if not back.any():  # one session: nothing goes back
            return []
        segs = np.concatenate(([0], np.cumsum(back)))
    if segs.max() == 0:
        return []
    d = pd.DataFrame({"step": steps, "seg": segs})
    agg = d.groupby("seg", sort=True)["step"].agg(["min", "max"])
    prev_max = agg["max"].cummax().shift(1)
    prev_min = agg["min"].cummin().shift(1)
    # a point is logged again when an earlier session logged the same step
    first_seg = d.groupby("step")["seg"].transform("min")
    relogged = (first_seg < d["seg"]).groupby(d["seg"]).sum()
    out = []
    for k, lo, pmax, pmin, rl in zip(agg.index, agg["min"], prev_max, prev_min, relogged.reindex(agg.index)):
        if pd.isna(pmax):  # the first session
            continue
        out.append(_Restart(where, metric, int(pmax), int(lo), int(rl), bool(lo <= pmin)))
    return out


def _restarts(run: Run) -> tuple[_Restart, ...]:
    """Every place where the logged steps go back: within each file (a ``segment`` boundary set by the
    reader, or a step lower than the one before it in reading order), and for the train loss from one
    file to the next of the same source (a resumed run usually writes a new event file). Computed once per
    Run (HD701 and HD705 both read it), in a few linear passes over numpy arrays of the scalars."""
    return run.cached(("resume._restarts",), lambda: tuple(_compute_restarts(run)))


def _grouped(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, bounds, first): a stable sort of ``keys`` (0..n_keys-1), each key's slice ``order[bounds[k]:
    bounds[k + 1]]`` (its positions, ascending) and its first position (``len(keys)`` when absent)."""
    order = np.argsort(keys.astype(_small(n_keys), copy=False), kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(keys, minlength=n_keys))))
    first = np.full(n_keys, len(keys), dtype=np.int64)
    has = bounds[1:] > bounds[:-1]
    first[has] = order[bounds[:-1][has]]
    return order, bounds, first


def _small(n: int):
    """The integer type numpy sorts fastest (radix sort up to 16 bits) that holds 0..n."""
    return np.int16 if n < np.iinfo(np.int16).max else np.int64


def _compute_restarts(run: Run) -> list[_Restart]:
    if run.scalars.empty:
        return []
    fc, files = run.codes("file")
    mc, metrics = run.codes("metric")
    nf = len(files)
    # the rows a groupby by (file, metric) keeps: both known
    known = None if fc.min(initial=0) >= 0 and mc.min(initial=0) >= 0 else np.flatnonzero((fc >= 0) & (mc >= 0))
    fck = fc if known is None else fc[known]
    if not len(fck):
        return []
    # files in the order of their first row: the first row of each run of equal file codes, then per file
    starts = np.flatnonzero(fck[1:] != fck[:-1]) + 1
    starts = np.concatenate(([0], starts))
    _o, _b, first_run = _grouped(fck[starts], nf)
    first_row = np.where(first_run < len(starts), starts[np.minimum(first_run, len(starts) - 1)], len(fck))
    names = [str(m) for m in metrics]
    counts = {}  # metric code -> points per file
    for m, name in enumerate(metrics):
        pos = run.positions(name)
        if len(pos):
            f = fc[pos]
            counts[m] = np.bincount(f[f >= 0], minlength=nf)
    step_col = run.column("step")
    seg_col = run.column("segment")
    by_metric: dict[int, tuple] = {}  # metric code -> its rows grouped by file (one stable sort per metric)

    def rows_of(m: int) -> tuple:
        if m not in by_metric:
            pos = run.positions(metrics[m])
            pos = pos[fc[pos] >= 0]
            by_metric[m] = (pos,) + _grouped(fc[pos], nf)
        return by_metric[m]

    out: list[_Restart] = []
    for f in sorted((f for f in range(nf) if first_row[f] < len(fck)), key=lambda f: first_row[f]):
        present = {m: int(c[f]) for m, c in counts.items() if c[f] > 0 and names[m] != "epoch"}
        if not present:
            continue
        m = next((k for k in present if names[k] == "loss"), None)
        if m is None:  # the most logged; on a tie the one this file logged first
            top = max(present.values())
            tied = [k for k, c in present.items() if c == top]
            m = tied[0] if len(tied) == 1 else min(tied, key=lambda k: rows_of(k)[0][rows_of(k)[3][f]])
        pos, order, bounds, _first = rows_of(m)
        rows = pos[order[bounds[f]:bounds[f + 1]]]
        out += _session_restarts(str(files[f]), names[m], step_col[rows], seg_col[rows])
    out += _cross_file_restarts(run)
    return out


def _cross_file_restarts(run: Run) -> list[_Restart]:
    """A later file of one source whose train-loss steps start at or below the last step of the file read
    before it."""
    pos = run.positions("loss")
    if not len(pos):
        return []
    fc, files = run.codes("file")
    sc, sources = run.codes("source")
    f, s = fc[pos], sc[pos]
    ok = (f >= 0) & (s >= 0)
    if not ok.all():
        pos, f, s = pos[ok], f[ok], s[ok]
    nf = len(files)
    key = s.astype(_small(len(sources) * nf))
    key *= nf
    key += f
    order, bounds, first = _grouped(key, len(sources) * nf)
    steps = run.column("step")[pos]
    by_source: dict = {}
    for k in sorted(np.flatnonzero(bounds[1:] > bounds[:-1]), key=lambda k: first[k]):  # files in reading order
        by_source.setdefault(int(k) // nf, []).append((files[int(k) % nf], steps[order[bounds[k]:bounds[k + 1]]]))
    out = []
    for files_of in by_source.values():
        for (a, sa), (b, sb) in zip(files_of, files_of[1:]):
            if sb.min() <= sa.max():
                out.append(_Restart(f"{_name(a)} -> {_name(b)}", "loss", int(sa.max()), int(sb.min()),
                                    int(np.isin(sb, sa).sum()), bool(sb.min() <= sa.min())))
    return out


def _name(path) -> str:
    parts = str(path).replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def _restart_lines(rs: list[_Restart]) -> list[str]:
    ev = [r.line() for r in rs[:_LIST]]
    if len(rs) > _LIST:
        ev.append(f"... {len(rs) - _LIST} more restart point(s)")
    return ev


@check("HD701", "resume-discontinuity", rank=70)
def resumed_run(run: Run, t: Thresholds) -> list[Finding]:
    """The logs hold a resumed run: steps between its last checkpoint and the restart are logged twice.

    What it detects: A file whose sequence of steps goes back (a `segment` boundary found by the reader, or
    a step lower than the one before it in reading order), or a later event file of the same source
    whose train-loss steps start at or below the last step of an earlier one, where the new session
    continues from inside the earlier one (one that starts over from its first step is a second run:
    HD705). Info: a fact about the logs that changes how the curves should be read.

    Why it happens: `resume_from_checkpoint` continues from the last saved checkpoint, not from the step
    where the run stopped: the steps in between are trained and logged a second time, and TensorBoard
    appends the new session to the same tags (or writes a new event file next to the old one). Where a
    step was logged twice, the later session's value is used, so the curves mix sessions.

    Example: runs/.../events.out.tfevents...: loss steps go back from 1500 to 1010 (50 logged step(s)
    logged again); a resume.

    Fix: Nothing is wrong by itself: read the curve per session (higgs-diag keeps the later value of a
    twice-logged step). Save more often (`save_steps`) so less is re-done; with transformers 4.46 under
    torch >= 2.6, resuming fails on `rng_state.pth` (weights-only unpickling, HD702), so pin torch < 2.6
    or upgrade transformers before relying on `resume_from_checkpoint`.
    """
    rs = [r for r in _restarts(run) if not r.from_scratch]
    if not rs:
        return []
    first, last = min(r.after for r in rs), max(r.before for r in rs)
    relogged = sum(r.relogged for r in rs)
    return [finding(
        Severity.INFO,
        f"Resumed run: the logged steps go back {len(rs)} time(s) and {relogged} logged step(s) appear twice",
        evidence=_restart_lines(rs), steps=(min(first, last), max(first, last)),
        metrics=tuple(sorted({r.metric for r in rs})))]


@check("HD705", "mixed-runs", rank=69)
def runs_share_a_folder(run: Run, t: Thresholds) -> list[Finding]:
    """Two or more different runs share one folder: their logs or checkpoints are mixed.

    What it detects: Logged steps that start over at or before the first step of the earlier session (in
    one file, or in a later event file of the same source): a new run from the beginning rather than
    a resume; or checkpoints of one output_dir whose trainer states disagree on `max_steps`,
    `logging_steps` or `train_batch_size`. Info.

    Why it happens: Reusing an `output_dir` (or `logging_dir`) for a new run or a new configuration appends
    its logs to the old run's and saves its checkpoints next to the old ones. The merged curves, the
    latest checkpoint and `best_model_checkpoint` may then come from different runs.

    Example: runs/b/events.2: loss steps go back from 500 to 10 (50 logged step(s) logged again); it
    starts over: a new run in the same logging dir.

    Fix: Use a new `output_dir` per run and configuration (or `overwrite_output_dir=True` to start clean);
    to continue a run, use `resume_from_checkpoint=True` in the same output_dir; analyse one run's logs
    and checkpoints at a time.
    """
    scratch = [r for r in _restarts(run) if r.from_scratch]
    configs = _checkpoint_configs(run)
    if not scratch and len(configs) < 2:
        return []
    ev = _restart_lines(scratch)
    for desc, paths in configs.items():
        ev.append(f"checkpoints with {desc}: " + ", ".join(paths[:4])
                  + (f" (+{len(paths) - 4} more)" if len(paths) > 4 else ""))
    how = [w for w, c in (("the logged steps start over", scratch), ("the checkpoints disagree on the "
                          "configuration", len(configs) >= 2)) if c]
    n = max(len(scratch) + 1, len(configs))
    steps = (min(r.after for r in scratch), max(r.before for r in scratch)) if scratch else None
    return [finding(
        Severity.INFO, f"{n} different runs share this folder: {' and '.join(how)}", evidence=ev,
        steps=(min(steps), max(steps)) if steps else None,
        metrics=tuple(sorted({r.metric for r in scratch})))]


def _checkpoint_configs(run: Run) -> dict[str, list[str]]:
    """The distinct (max_steps, logging_steps, train_batch_size) of the read trainer states, described, with
    the files of each; only those that know at least one of them."""
    keys = ("max_steps", "logging_steps", "train_batch_size")
    sigs: dict[tuple, list[str]] = {}
    for s in run.states:
        if s is not None:
            sigs.setdefault(tuple(getattr(s, k) for k in keys), []).append(s.path)
    return {", ".join(f"{k}={v}" for k, v in zip(keys, sig) if v is not None): paths
            for sig, paths in sigs.items() if any(v is not None for v in sig)}


@check("HD703", "resume-discontinuity", rank=71)
def epoch_resets(run: Run, t: Thresholds) -> list[Finding]:
    """The epoch counter goes back while the step keeps increasing.

    What it detects: Logged `epoch` values that go down from one logged step to the next. Info: per-epoch
    reasoning does not hold across these points.

    Why it happens: The epoch counter restarted while the global step continued: the run was resumed (a
    streaming IterableDataset restarts its epoch count on resume, or the data loader was rebuilt) or a
    second training session appended to the same logs. Per-epoch reasoning ("the loss drops at each
    new epoch") does not hold across these points, and the data order after each reset may repeat
    samples already seen.

    Example: epoch 2.98 at step 5000 -> 0.0 at step 5100.

    Fix: Nothing to fix by itself; with a streaming dataset, set `max_steps` and read progress by step. If
    the data should not repeat, resume with the data-skipping default (`ignore_data_skip=False`).
    """
    e = finite(run.series("epoch"))
    v = e.to_numpy()
    idx = np.flatnonzero(np.diff(v) < -1e-6) if len(v) >= 2 else np.zeros(0, dtype=int)
    if not len(idx):
        return []
    steps = e.index.to_numpy()
    ev = [f"epoch {fmt(v[i])} at step {int(steps[i])} -> {fmt(v[i + 1])} at step {int(steps[i + 1])}"
          for i in idx[:_LIST]]
    if len(idx) > _LIST:
        ev.append(f"... {len(idx) - _LIST} more")
    return [finding(Severity.INFO, f"epoch goes back {len(idx)} time(s) while the step keeps increasing",
                    evidence=ev, steps=(int(steps[idx[0]]), int(steps[idx[-1] + 1])), metrics=("epoch",))]


def _logging_steps(run: Run) -> float | None:
    ls = run.state.logging_steps if run.state else None
    if ls is None:
        ls = run.arg("logging_steps")
    if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not math.isfinite(ls) or ls <= 0:
        return None
    if ls < 1:  # a ratio of the run
        ms = run.state.max_steps if run.state else None
        return float(max(1, math.ceil(ls * ms))) if ms else None
    return float(ls)


@check("HD704", "resume-discontinuity", rank=72, thresholds=("trend_min_points", "resume_gap_factor"))
def log_gaps(run: Run, t: Thresholds) -> list[Finding]:
    """Stretches of steps with no training log.

    What it detects: Gaps between consecutive train-loss steps larger than `resume_gap_factor` x
    `logging_steps` (the median spacing when `logging_steps` is unknown), in a run with at least
    `trend_min_points` logged points. Info.

    Why it happens: Logs written between the last checkpoint and a crash were lost when the run was resumed
    elsewhere, an event file is missing, or `logging_steps` changed between sessions. Anything that
    happened in those stretches (a NaN, a spike) is invisible.

    Example: loss is logged every 10 steps (logging_steps), but not between steps 500 and 1000; about 49
    expected log points missing.

    Fix: Keep every session's logs (one `logging_dir` per run under `output_dir/runs`) and pass them all
    to higgs-diag; keep `logging_steps` constant across resumes.
    """
    loss = run.series("loss")
    if len(loss) < t.trend_min_points:
        return []
    ls = _logging_steps(run)
    steps = loss.index.to_numpy()
    diffs = np.diff(steps)
    expected = ls or float(np.median(diffs))
    if not expected > 0:
        return []
    big = np.flatnonzero(diffs > t.resume_gap_factor * expected)
    if not len(big):
        return []
    ev = [f"loss is logged every {fmt(expected)} steps ({'logging_steps' if ls else 'median spacing'}), but not "
          "between steps " + ", ".join(f"{int(steps[i])} and {int(steps[i + 1])}" for i in big[:_LIST])
          + (f" (+{len(big) - _LIST} more)" if len(big) > _LIST else ""),
          f"about {int(np.sum(diffs[big] / expected - 1))} expected log point(s) missing"]
    return [finding(Severity.INFO, f"Gaps in the logged steps: {len(big)} stretch(es) with no train log",
                    evidence=ev, steps=(int(steps[big[0]]), int(steps[big[-1] + 1])), metrics=("loss",))]


# An epoch counter that restarts is what a resume (or a second run appended to the logs) looks like.
causes("HD703", "HD701", "HD705")
