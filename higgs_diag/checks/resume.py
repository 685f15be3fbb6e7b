"""Resume discontinuities: restarts, re-logged steps, missing log stretches, mixed runs in one folder."""
from __future__ import annotations

import math

import numpy as np

from ..config import Thresholds
from ..diagnosis import Finding, Severity
from ..run.model import Run
from . import check, finding
from ._util import finite, fmt


def _restarts(run: Run) -> list[tuple[str, str, int, int, int, bool]]:
    """(file, metric, last step before, first step after, steps logged again, from scratch) for every
    place where a file's sequence of steps goes back: a `segment` boundary set by the reader, or,
    without one, a step lower than the one before it in the file's order; and across event files of the
    same source. "From scratch" when the new session starts at or before the first step of the previous
    one (a new run in the same logging dir rather than a resume from a checkpoint)."""
    df = run.scalars
    if df.empty:
        return []
    out = []
    for file, fdf in df.groupby("file", sort=False):
        # the train loss is the clearest trace of a session; else the most logged metric (not epoch,
        # which train and eval entries both log at the same step)
        metrics = fdf["metric"].value_counts()
        metrics = metrics[metrics.index != "epoch"]
        if metrics.empty:
            continue
        metric = "loss" if "loss" in metrics.index else str(metrics.index[0])
        sub = fdf[fdf["metric"] == metric]
        steps = sub["step"].to_numpy()
        segs = sub["segment"].to_numpy() if "segment" in sub.columns else np.zeros(len(sub), dtype=int)
        if len(segs) and segs.max() > 0:
            for k in sorted(set(int(x) for x in segs if x > 0)):
                prev = steps[segs < k]
                cur = steps[segs == k]
                if len(prev) == 0 or len(cur) == 0:
                    continue
                relogged = int(np.isin(cur, prev).sum())
                out.append((str(file), metric, int(prev.max()), int(cur.min()), relogged,
                            bool(cur.min() <= prev.min())))
            continue
        for i in range(1, len(steps)):
            if steps[i] < steps[i - 1]:
                prev = steps[:i]
                nxt = steps[i:]
                down = np.where(np.diff(nxt) < 0)[0]
                cur = nxt[: int(down[0]) + 1] if len(down) else nxt
                out.append((str(file), metric, int(steps[i - 1]), int(steps[i]), int(np.isin(cur, prev).sum()),
                            bool(steps[i] <= steps[0])))
    # a resumed run usually writes a new event file: the train loss of a later file of the same source
    # starting at or below the last step of an earlier one is the same restart, across files
    tl = df[df["metric"] == "loss"]
    for _source, sdf in tl.groupby("source", sort=False):
        files = list(dict.fromkeys(sdf["file"].tolist()))  # in reading order
        for a, b in zip(files, files[1:]):
            sa = sdf.loc[sdf["file"] == a, "step"].to_numpy()
            sb = sdf.loc[sdf["file"] == b, "step"].to_numpy()
            if len(sa) and len(sb) and sb.min() <= sa.max():
                out.append((f"{_name(a)} -> {_name(b)}", "loss", int(sa.max()), int(sb.min()),
                            int(np.isin(sb, sa).sum()), bool(sb.min() <= sa.min())))
    return out


def _name(path: str) -> str:
    parts = str(path).replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def _epoch_resets(run: Run) -> list[tuple[int, float, int, float]]:
    e = finite(run.series("epoch"))
    if len(e) < 2:
        return []
    d = e.diff()
    resets = []
    for s in d.index[d < -1e-6]:
        i = e.index.get_loc(s)
        resets.append((int(e.index[i - 1]), float(e.iloc[i - 1]), int(s), float(e.iloc[i])))
    return resets


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


@check("HD701", "resume-discontinuity", rank=70)
def resume_discontinuity(run: Run, t: Thresholds) -> list[Finding]:
    """The logs show a resumed or restarted run: steps logged twice, epoch resets, missing stretches.

    What it detects: (a) A file whose step sequence goes back (a resumed run re-logging steps it had already
    logged, or a `segment` boundary found by the reader); (b) `epoch` going down while
    `step` goes up; (c) gaps in the train-loss steps larger than `resume_gap_factor` x
    `logging_steps`; (d) checkpoints of one output_dir whose trainer states disagree on
    `max_steps`, `logging_steps` or `train_batch_size` (two runs sharing a folder). Info: these
    are facts about the logs that change how the curves should be read.

    Why it happens: `resume_from_checkpoint` restarts from the last saved step, so the steps between that
    checkpoint and the crash are trained and logged again; TensorBoard appends the new session to the
    same tags. A streaming (IterableDataset) run restarts its epoch counter on resume. Logs between a
    crash and the last checkpoint are lost when the folder is reused. Reusing an `output_dir` for a
    new configuration mixes checkpoints of different runs.

    Example: runs/.../events.out.tfevents...: loss steps go back from 1500 to 1001 (500 steps logged twice);
    epoch resets from 2.98 at step 5000 to 0.0 at step 5100.

    Fix: Nothing is wrong by itself: read the curve per session (higgs-diag keeps the later value of a
    twice-logged step). Use a new `output_dir` per configuration; with transformers 4.46 under
    torch >= 2.6, resuming fails on `rng_state.pth` (weights-only unpickling), so pin torch < 2.6 or
    upgrade transformers before relying on `resume_from_checkpoint`.
    """
    out: list[Finding] = []

    rs = _restarts(run)
    if rs:
        ev = []
        for file, metric, before, after, relogged, scratch in rs[:6]:
            ev.append(f"{file}: {metric} steps go back from {before} to {after}"
                      + (f" ({relogged} logged step(s) logged again)" if relogged else "")
                      + ("; it starts over: a new run in the same logging dir" if scratch else "; a resume"))
        if len(rs) > 6:
            ev.append(f"... {len(rs) - 6} more restart point(s)")
        first = min(r[3] for r in rs)
        last = max(r[2] for r in rs)
        n_scratch = sum(1 for r in rs if r[5])
        kinds = ", ".join(k for k in (f"{len(rs) - n_scratch} resume(s)" if len(rs) > n_scratch else "",
                                      f"{n_scratch} new run(s) from the start" if n_scratch else "") if k)
        out.append(finding(
            Severity.INFO,
            f"Several training sessions in the logs: the step sequence restarts {len(rs)} time(s) ({kinds})",
            evidence=ev,
            explanation=(
                "A resumed run continues from its last checkpoint, not from the step where it stopped: the steps "
                "in between are trained and logged a second time, and both sessions sit in the same log. A run "
                "started again from the beginning in the same logging dir does the same with every step. Where a "
                "step was logged twice, the later session's value is used, so the curves mix sessions."),
            fix=("Nothing to fix for a resume. Give each new run its own output_dir/logging_dir so its curves are "
                 "not merged with an older run's; to resume, use resume_from_checkpoint=True in the same output_dir "
                 "and save more often (save_steps) so less is re-done; with transformers 4.46 under torch >= 2.6 "
                 "resuming fails on rng_state.pth (weights-only unpickling)."),
            steps=(min(first, last), max(first, last)),
            metrics=tuple(sorted({r[1] for r in rs}))))

    er = _epoch_resets(run)
    if er:
        ev = [f"epoch {fmt(e0)} at step {s0} -> {fmt(e1)} at step {s1}" for s0, e0, s1, e1 in er[:6]]
        if len(er) > 6:
            ev.append(f"... {len(er) - 6} more")
        out.append(finding(
            Severity.INFO,
            f"epoch goes back {len(er)} time(s) while the step keeps increasing",
            evidence=ev,
            explanation=(
                "The epoch counter restarted while the global step continued: the run was resumed (a streaming "
                "IterableDataset restarts its epoch count, or the data loader was rebuilt) or a second training "
                "session appended to the same logs. Per-epoch reasoning (\"loss drops at each new epoch\") does not "
                "hold across these points, and the data order after each reset may repeat samples already seen."),
            fix=("Nothing to fix by itself; with a streaming dataset, set max_steps and read progress by step. If the "
                 "data should not repeat, resume with the data-skipping default (ignore_data_skip=False)."),
            steps=(er[0][0], er[-1][2]), metrics=("epoch",)))

    loss = run.series("loss")
    ls = _logging_steps(run)
    if len(loss) >= t.trend_min_points:
        steps = loss.index.to_numpy()
        diffs = np.diff(steps)
        expected = ls if ls else float(np.median(diffs)) if len(diffs) else None
        if expected and expected > 0:
            big = np.where(diffs > t.resume_gap_factor * expected)[0]
            if len(big):
                ev = [f"loss is logged every {fmt(expected)} steps "
                      f"({'logging_steps' if ls else 'median spacing'}), but not between steps "
                      + ", ".join(f"{int(steps[i])} and {int(steps[i + 1])}" for i in big[:6])
                      + (f" (+{len(big) - 6} more)" if len(big) > 6 else "")]
                missing = int(sum(diffs[i] / expected - 1 for i in big))
                ev.append(f"about {missing} expected log point(s) missing")
                out.append(finding(
                    Severity.INFO,
                    f"Gaps in the logged steps: {len(big)} stretch(es) with no train log",
                    evidence=ev,
                    explanation=(
                        "Stretches of steps have no training log: logs written between the last checkpoint and a "
                        "crash were lost when the run was resumed elsewhere, an event file is missing, or "
                        "logging_steps changed between sessions. Anything that happened in those stretches (a NaN, "
                        "a spike) is invisible."),
                    fix=("Keep every session's logs (one logging_dir per run under output_dir/runs) and pass them all "
                         "to higgs-diag; keep logging_steps constant across resumes."),
                    steps=(int(steps[big[0]]), int(steps[big[-1] + 1])), metrics=("loss",)))

    states = [s for s in run.states if s is not None]
    if len(states) >= 2:
        keys = ("max_steps", "logging_steps", "train_batch_size")
        sigs = {}
        for s in states:
            sig = tuple(getattr(s, k) for k in keys)
            sigs.setdefault(sig, []).append(s.path)
        known = {sig: p for sig, p in sigs.items() if any(v is not None for v in sig)}
        if len(known) >= 2:
            ev = []
            for sig, paths in known.items():
                desc = ", ".join(f"{k}={v}" for k, v in zip(keys, sig) if v is not None)
                ev.append(f"{desc}: " + ", ".join(paths[:4]) + (f" (+{len(paths) - 4} more)" if len(paths) > 4 else ""))
            out.append(finding(
                Severity.INFO,
                f"Checkpoints from {len(known)} different runs share this output_dir",
                evidence=ev,
                explanation=(
                    "The trainer_state.json files of the checkpoints disagree on max_steps, logging_steps or the batch "
                    "size: a second run with another configuration wrote into the same output_dir. The latest "
                    "checkpoint, best_model_checkpoint and the merged history may come from different runs."),
                fix=("Use a new output_dir per configuration (or overwrite_output_dir=True to start clean); "
                     "analyse one run's checkpoints at a time."),
                steps=None, metrics=()))
    return out
