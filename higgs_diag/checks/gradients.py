"""Gradient-norm spikes: those that damage the run (HD403), those it absorbs (HD407), and spikes that reach
the weights unclipped (HD408).

A spike is judged against the run's own recent level (a trailing rolling median), never against an
absolute bound: healthy runs log gradient norms anywhere from 0.3 to 2e5.
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
from ._util import finite, fmt, loss_not_cross_entropy, trailing_medians_at, trailing_min, trailing_window_ok

_SPIKE_THRESHOLDS = ("grad_spike_factor", "grad_spike_window", "grad_spike_min_history")


@dataclass
class _Spikes:
    g: pd.Series  # finite, nonzero grad_norm
    ref: pd.Series  # its trailing rolling median, where a spike was possible (at least at every spike; NaN elsewhere)
    spikes: pd.Series  # the points above grad_spike_factor x ref

    @property
    def ratio(self) -> pd.Series:
        return self.spikes / self.ref[self.spikes.index]


def _spikes(run: Run, t: Thresholds) -> _Spikes | None:
    """The spikes, computed once per Run and thresholds (HD403, HD407 and HD408 all read them)."""
    return run.cached(("gradients._spikes", t.grad_spike_window, t.grad_spike_min_history, t.grad_spike_factor),
                      lambda: _find_spikes(run, t))


def _find_spikes(run: Run, t: Thresholds) -> _Spikes | None:
    g = finite(run.series("grad_norm"))
    pos = g.to_numpy() > 0
    g = g if pos.all() else g[pos]  # exact zeros (skipped or frozen steps) are no reference level
    if len(g) <= t.grad_spike_min_history:
        return None
    w, mp, factor = t.grad_spike_window, t.grad_spike_min_history, t.grad_spike_factor
    ref = None
    if trailing_window_ok(w, mp) and factor >= 0:
        # The median of positive values is at least their minimum, so a point at or below factor x the trailing
        # minimum is no spike: the exact median is needed only at the other points (a few on a healthy run).
        gv = g.to_numpy()
        with np.errstate(invalid="ignore", over="ignore"):  # 0 x inf (no history yet) is no candidate
            above = gv > factor * trailing_min(gv, w)
            above[:max(0, int(mp))] = False  # fewer than min_history points before: no reference yet
            cand = np.flatnonzero(above)
        if len(cand) <= len(gv) // 20 + 64:
            r = np.full(len(gv), np.nan)
            r[cand] = trailing_medians_at(gv, cand, w, mp)
            ref = pd.Series(r, index=g.index, name=g.name)
    if ref is None:
        ref = g.shift(1).rolling(w, min_periods=mp).median()
    spike = (ref > 0) & (g > factor * ref)
    return _Spikes(g, ref, g[spike]) if spike.any() else None


def _loss_jumps(run: Run, t: Thresholds, sp: _Spikes) -> list[str]:
    """One line per spike after which the median loss over the next loss_jump_points logged points exceeds
    loss_jump_factor x its trailing median and rises by loss_jump_min_rise; [] for non-CE objectives.
    Computed once per Run and thresholds (HD403 and HD407)."""
    key = ("gradients._loss_jumps", t.grad_spike_window, t.grad_spike_min_history, t.grad_spike_factor,
           t.loss_jump_points, t.loss_jump_factor, t.loss_jump_min_rise)
    return list(run.cached(key, lambda: tuple(_find_loss_jumps(run, t, sp))))


def _find_loss_jumps(run: Run, t: Thresholds, sp: _Spikes) -> list[str]:
    loss = finite(run.series("loss"))
    if loss_not_cross_entropy(run) is not None or len(loss) <= t.grad_spike_min_history:
        return []
    lv = loss.to_numpy()
    at = loss.index.searchsorted(sp.spikes.index.to_numpy(), side="left")
    if trailing_window_ok(t.grad_spike_window, t.grad_spike_min_history):
        lref = np.full(len(lv), np.nan)  # the trailing median, where it is read (after each spike)
        inside = at[at < len(lv)]
        lref[inside] = trailing_medians_at(lv, inside, t.grad_spike_window, t.grad_spike_min_history)
    else:
        lref = loss.shift(1).rolling(t.grad_spike_window, min_periods=t.grad_spike_min_history).median().to_numpy()
    out = []
    for s, i in zip(sp.spikes.index, at):
        if i >= len(lv):
            continue
        later = lv[i: i + t.loss_jump_points]
        r, m = float(lref[i]), float(np.median(later))
        if np.isfinite(r) and r > 0 and m > t.loss_jump_factor * r and m - r >= t.loss_jump_min_rise:
            out.append(f"spike at step {int(s)}: loss median {fmt(m)} over the next {len(later)} logged "
                       f"point(s) vs {fmt(r)} before")
    return out


def _clipping_disabled(run: Run) -> bool:
    """True when the TrainingArguments switch gradient clipping off: the Trainer clips only when
    ``max_grad_norm`` is set and > 0."""
    if not run.args or "max_grad_norm" not in run.args:
        return False
    mgn = run.args["max_grad_norm"]
    try:
        return mgn is None or float(mgn) <= 0
    except (TypeError, ValueError):
        return False


def _spike_evidence(run: Run, t: Thresholds, sp: _Spikes) -> list[str]:
    g, spikes, ratio = sp.g, sp.spikes, sp.ratio
    n = len(g)
    top = ratio.sort_values(ascending=False).index[:5]
    listed = "; ".join(f"step {int(s)} {fmt(g[s])} (median {fmt(sp.ref[s])}, x{ratio[s]:.0f})" for s in sorted(top))
    ev = [f"grad_norm exceeds {t.grad_spike_factor:g}x its trailing median over {t.grad_spike_window} logged points "
          f"at {len(spikes)} of {n} logged steps: {listed}"
          + (f" (+{len(spikes) - len(top)} more)" if len(spikes) > len(top) else ""),
          f"run median grad_norm {fmt(g.median())}"]
    if len(spikes) >= max(t.grad_spike_frequent_min, math.ceil(t.grad_spike_frequent_share * n)):
        ev.append(f"spikes are frequent: {len(spikes)} of {n} logged steps")
    after_last = g[g.index > spikes.index[-1]]
    if not after_last.empty:
        ev.append(f"after the last spike (step {int(spikes.index[-1])}) grad_norm has median {fmt(after_last.median())}")
    mgn = run.arg("max_grad_norm")
    if mgn is not None:
        ev.append(f"TrainingArguments.max_grad_norm = {mgn}" + (" (clipping disabled)" if _clipping_disabled(run) else ""))
    return ev


def _span(sp: _Spikes) -> tuple[int, int]:
    return int(sp.spikes.index[0]), int(sp.spikes.index[-1])


@check("HD403", "grad-explosion", rank=32,
       thresholds=_SPIKE_THRESHOLDS + ("loss_jump_factor", "loss_jump_points", "loss_jump_min_rise"))
def grad_explosion(run: Run, t: Thresholds) -> list[Finding]:
    """Gradient-norm spikes followed by a lasting jump in the training loss.

    What it detects: Logged `grad_norm` above `grad_spike_factor` (10x) its trailing rolling median over
    `grad_spike_window` logged points (after `grad_spike_min_history` points of history; exact zeros
    are left out of the median), where after at least one spike the median loss over the next
    `loss_jump_points` logged points exceeds `loss_jump_factor` x its trailing median and rises by at
    least `loss_jump_min_rise` (a noisy single batch is not a jump). A warning. Spikes the run absorbs
    are HD407. Not for non-cross-entropy objectives.

    Why it happens: The updates destabilise the model: the learning rate is too high for some batches
    (often right after warmup, where it peaks), gradient clipping is off or weak, or outlier batches
    (very long sequences or, for Higgs Audio, very long audio segments, rare tokens) get a full-size
    step; fp16 loss-scale effects add to it. The Trainer logs the norm before clipping.

    Example: grad_norm exceeds 10x its rolling median at 1 of 300 logged steps: step 151 40 (median 0.41,
    x98); spike at step 151: loss median 2.5 over the next 3 logged points vs 1.38 before.

    Fix: Lower `learning_rate` or lengthen warmup (`warmup_ratio=0.05..0.1`), keep `max_grad_norm=1.0`
    (never 0), and inspect the batches at the spike steps (cap the sequence/audio length in the
    collator, drop corrupt samples); restart from a checkpoint saved before the first jump.
    """
    sp = _spikes(run, t)
    jumps = _loss_jumps(run, t, sp) if sp is not None else []
    if not jumps:
        return []
    ev = _spike_evidence(run, t, sp)
    ev.insert(2, f"the loss jumps after {len(jumps)} spike(s): " + "; ".join(jumps[:3]))
    return [finding(
        Severity.WARNING,
        f"Gradient spikes followed by loss jumps: grad_norm above {t.grad_spike_factor:g}x its rolling median at "
        f"{len(sp.spikes)} step(s), the loss jumps after {len(jumps)}",
        evidence=ev, steps=_span(sp), metrics=("grad_norm", "loss"))]


@check("HD407", "grad-explosion", rank=33,
       thresholds=_SPIKE_THRESHOLDS + ("loss_jump_factor", "loss_jump_points", "loss_jump_min_rise",
                                       "grad_spike_frequent_min", "grad_spike_frequent_share"))
def absorbed_grad_spikes(run: Run, t: Thresholds) -> list[Finding]:
    """Gradient-norm spikes that the run absorbs: the loss does not react.

    What it detects: The spikes of HD403 (`grad_norm` above `grad_spike_factor` x its trailing rolling
    median) when the loss does not jump after any of them (or the loss is a preference/RL objective,
    whose jumps are not judged). Info, even when frequent (at least `grad_spike_frequent_min` and
    `grad_spike_frequent_share` of the logged points): a well-fit classifier or a noisy SFT run shows
    many such spikes without harm.

    Why it happens: The Trainer logs the gradient norm before clipping. Spikes come from outlier batches
    (very long sequences or, for Higgs Audio, very long audio segments, rare tokens, a misclassified
    sample when the loss is already near 0) and are harmless when `max_grad_norm` clips the update and
    the loss does not react.

    Example: grad_norm exceeds 10x its rolling median at 1 of 648 logged steps: step 30 84.88 (median 2.78,
    x30); the loss does not jump after it.

    Fix: Nothing to do while the loss does not react; keep `max_grad_norm=1.0`. If the spikes are
    frequent, inspect the batches at the spike steps and cap the sequence/audio length in the collator.
    """
    sp = _spikes(run, t)
    if sp is None or _loss_jumps(run, t, sp):
        return []
    ev = _spike_evidence(run, t, sp)
    ce = loss_not_cross_entropy(run) is None
    if not ce:
        ev.insert(2, "the loss is not a cross-entropy (preference/RL objective): loss jumps not judged")
    elif not run.series("loss").empty:
        ev.insert(2, "the loss does not jump after any spike: the run absorbed them")
    frequent = any(e.startswith("spikes are frequent") for e in ev)
    return [finding(
        Severity.INFO,
        f"Gradient spikes absorbed by the run: grad_norm above {t.grad_spike_factor:g}x its rolling median at "
        f"{len(sp.spikes)} step(s){' (frequent)' if frequent else ''}",
        evidence=ev, steps=_span(sp), metrics=("grad_norm", "loss"))]


@check("HD408", "grad-explosion", rank=31, thresholds=_SPIKE_THRESHOLDS)
def unclipped_grad_spikes(run: Run, t: Thresholds) -> list[Finding]:
    """Gradient clipping is disabled while grad_norm spikes: the spikes reach the weights in full.

    What it detects: `max_grad_norm` set to 0, a negative value or null in the TrainingArguments while
    `grad_norm` spikes above `grad_spike_factor` x its trailing rolling median (as in HD403/HD407). A
    warning, whether or not the loss reacted yet.

    Why it happens: The Trainer clips gradients only when `max_grad_norm` is set and > 0. With clipping
    off, a spike's full update reaches the weights: one outlier batch can move the model far from where
    it was, which is how a run that absorbed its spikes so far diverges later.

    Example: TrainingArguments.max_grad_norm = 0.0; grad_norm exceeds 10x its rolling median at step 101
    (40 vs a median of 0.41).

    Fix: Set `max_grad_norm=1.0` (the Trainer's default); if spikes remain frequent, inspect the batches at
    the spike steps.
    """
    if not _clipping_disabled(run):
        return []
    sp = _spikes(run, t)
    if sp is None:
        return []
    return [finding(
        Severity.WARNING,
        f"Gradient clipping disabled (max_grad_norm = {run.args['max_grad_norm']}) while grad_norm spikes "
        f"at {len(sp.spikes)} step(s)",
        evidence=_spike_evidence(run, t, sp), steps=_span(sp), metrics=("grad_norm",))]


# Without clipping, the spike's full update reaches the weights: that is why the loss jumps after it.
causes("HD403", "HD408")
