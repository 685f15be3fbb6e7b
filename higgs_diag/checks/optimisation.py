"""Optimisation: does the training loss move, does it stay stable, does it keep improving.

Gradient spikes are in ``gradients.py``, the held-out curve in ``overfitting.py``. Symptoms here (a flat
loss, a plateau, a divergence) often have a root cause found by another rule (a masked NaN, a zero
learning rate): the `causes` declarations at the bottom link them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..config import Thresholds
from ..diagnosis import Finding, Severity
from ..run.model import Run
from . import causes, check, finding
from ._util import centred_max, finite, fmt, loss_not_cross_entropy, smoothed, smoothing_window, value_at


# ---- helpers -------------------------------------------------------------------------------------

def _zero_grad(run: Run, t: Thresholds) -> tuple[pd.Series, int, float] | None:
    """(finite grad_norm, count of exact zeros, share) when grad_norm is 0 on enough steps, else None."""
    g = finite(run.series("grad_norm"))
    if len(g) < t.trend_min_points:
        return None
    n0 = int((g == 0.0).sum())
    share = n0 / len(g)
    return (g, n0, share) if share >= t.zero_grad_share else None


def _flat_loss(run: Run, t: Thresholds) -> pd.Series | None:
    """The finite loss when it is flat over the whole run (identical or negligible relative range)."""
    loss = finite(run.series("loss"))
    if len(loss) < t.trend_min_points:
        return None
    lo, hi = float(loss.min()), float(loss.max())
    scale = abs(float(loss.median()))
    if hi == lo:
        return loss
    if scale > 0 and (hi - lo) <= t.flat_loss_rel_range * scale:
        return loss
    return None


def _warmup_end(run: Run, t: Thresholds) -> int:
    """The step after which the run is past warmup: the first step at which the learning rate reaches its
    peak (within lr_rel_tolerance) when it is logged, else the configured warmup_steps, else the first
    logged step."""
    lr = finite(run.series("learning_rate"))
    if not lr.empty and float(lr.max()) > 0:
        return int(lr.index[lr >= float(lr.max()) * (1 - t.lr_rel_tolerance)][0])
    ws = run.arg("warmup_steps")
    if isinstance(ws, (int, float)) and not isinstance(ws, bool) and ws > 0:
        return int(ws)
    loss = run.series("loss")
    return int(loss.index[0]) if not loss.empty else 0


# ---- HD401 / HD406: no learning ------------------------------------------------------------------

@check("HD401", "no-learning", rank=0,
       thresholds=("zero_grad_share", "trend_min_points", "suspicious_constants", "masked_min_steps"))
def zero_gradients(run: Run, t: Thresholds) -> list[Finding]:
    """The model is not being trained: grad_norm is exactly 0 on (nearly) every logged step.

    What it detects: `grad_norm` exactly 0.0 on at least `zero_grad_share` (default 90%) of the logged
    steps (at least `trend_min_points` of them). Critical. When the loss on those steps sits on one of
    the `suspicious_constants` for `masked_min_steps` steps or more, the constant fallback (HD304) is
    named as the cause.

    Why it happens: The Trainer logs the gradient norm it clips just before `optimizer.step()`. Exactly
    0.0 means no parameter received a gradient: `backward()` was never called (a `training_step`
    override that returns the loss without `self.accelerator.backward(loss)`), no parameter requires
    grad (a frozen base model whose PEFT `target_modules` match nothing, `requires_grad=False`
    everywhere), or the loss has no graph (rebuilt with `torch.tensor(loss.item())`, computed under
    `torch.no_grad()`, or a constant substituted for it). The weights never change: every checkpoint
    equals the starting model.

    Example: grad_norm is exactly 0.0 at 50 of 50 logged steps (steps 1..50); loss 6.931..6.932 over the run.

    Fix: Remove the `training_step` override or make it call `self.accelerator.backward(loss)` and return
    `loss.detach()`; check that `sum(p.numel() for p in model.parameters() if p.requires_grad) > 0`
    (PEFT: `model.print_trainable_parameters()`, and `target_modules` that match the model's layer
    names); return the model's loss tensor from `compute_loss` without `.item()` or `.detach()`.
    """
    zg = _zero_grad(run, t)
    if zg is None:
        return []
    g, n0, share = zg
    loss = finite(run.series("loss"))
    lr = finite(run.series("learning_rate"))
    zeros = g[g == 0.0]
    ev = [f"grad_norm is exactly 0.0 at {n0} of {len(g)} logged steps ({share:.0%}; "
          f"steps {int(zeros.index[0])}..{int(zeros.index[-1])})"]
    nz = g[g != 0.0]
    if not nz.empty:
        ev.append(f"nonzero grad_norm at {len(nz)} step(s), e.g. step {int(nz.index[0])}: {fmt(nz.iloc[0])}")
    if not loss.empty:
        ev.append(f"loss over the run: first {fmt(loss.iloc[0])} (step {int(loss.index[0])}), "
                  f"last {fmt(loss.iloc[-1])} (step {int(loss.index[-1])}), range {fmt(loss.min())}..{fmt(loss.max())}")
    if not lr.empty:
        ev.append(f"learning_rate is {fmt(lr.max())} at its peak: the optimizer had a rate to apply "
                  "but no gradient" if lr.max() > 0 else "learning_rate is 0.0 throughout")
    # a loss pinned to a fallback constant on the zero-gradient steps is HD304's finding, and its cause
    lz = loss[loss.index.isin(zeros.index)]
    const = any(int((lz == float(c)).sum()) >= t.masked_min_steps for c in t.suspicious_constants)
    if const:
        ev.append("the loss on these steps is one of the constants a fallback writes (see HD304)")
    return [finding(Severity.CRITICAL, f"No gradient: grad_norm is exactly 0.0 on {n0} of {len(g)} logged steps",
                    caused_by="HD304" if const else None, evidence=ev,
                    steps=(int(zeros.index[0]), int(zeros.index[-1])), metrics=("grad_norm", "loss"))]


@check("HD406", "no-learning", rank=20,
       thresholds=("trend_min_points", "flat_loss_rel_range", "suspicious_constants", "zero_grad_share"))
def flat_loss(run: Run, t: Thresholds) -> list[Finding]:
    """The loss does not move at all although gradients are computed.

    What it detects: A train `loss` that is identical, or varies by at most `flat_loss_rel_range` of its
    magnitude, over the whole run (at least `trend_min_points` logged points) while `grad_norm` is
    finite and nonzero, or not logged. A warning. Not for non-cross-entropy objectives, nor when
    `grad_norm` is mostly zero or non-finite (HD401, HD302-HD306 explain those). When the learning rate
    is 0 throughout, the learning-rate rule (HD501) is named as the cause.

    Why it happens: Gradients are computed but the loss never changes, so the updates do not reach the
    weights that produce it: a learning rate of 0, an optimizer built over other parameters (created
    before a PEFT wrap, or custom param groups), a logged value that is not the model's loss (a constant
    or a cached number in a custom `compute_loss`), or a model whose output is detached from the
    trainable parameters.

    Example: loss is identical (2.303) at all 30 logged steps (1..30); grad_norm is finite and nonzero:
    median 0.8.

    Fix: Check that `learning_rate` > 0 in the logs, let the Trainer create the optimizer after the model
    is wrapped (or pass `optimizers=(opt, sched)` built from the `model.parameters()` that require
    grad), and return the loss computed from this step's outputs in `compute_loss`.
    """
    if loss_not_cross_entropy(run) is not None or _zero_grad(run, t) is not None:
        return []
    flat = _flat_loss(run, t)
    if flat is None:
        return []
    g = run.series("grad_norm")
    gf = finite(g)
    if not g.empty and (gf.empty or float(gf.median()) == 0.0 or len(gf) < len(g) / 2):
        return []  # non-finite or zero gradients: the numerics rules (or HD401) explain it
    lr = finite(run.series("learning_rate"))
    lo, hi = float(flat.min()), float(flat.max())
    identical = lo == hi
    ev = [(f"loss is identical ({fmt(lo)}) at all {len(flat)} logged steps" if identical else
           f"loss stays within {fmt(lo)}..{fmt(hi)} (relative range {(hi - lo) / abs(float(flat.median())):.1e}) "
           f"at all {len(flat)} logged steps") + f" ({int(flat.index[0])}..{int(flat.index[-1])})"]
    if identical and any(lo == float(c) for c in t.suspicious_constants):
        ev.append(f"{fmt(lo)} is one of the constants a fallback writes instead of a real loss")
    ev.append(f"grad_norm is finite and nonzero: median {fmt(gf.median())}, range {fmt(gf.min())}..{fmt(gf.max())}"
              if not gf.empty else "grad_norm is not logged")
    if not lr.empty:
        ev.append(f"learning_rate {fmt(lr.min())}..{fmt(lr.max())}")
    lr_zero = not lr.empty and float(lr.max()) == 0.0
    return [finding(
        Severity.WARNING,
        f"Loss does not move: {'identical' if identical else 'flat'} over all {len(flat)} logged steps",
        caused_by="HD501" if lr_zero else None, evidence=ev,
        steps=(int(flat.index[0]), int(flat.index[-1])), metrics=("loss", "grad_norm"))]


# ---- HD402 ---------------------------------------------------------------------------------------

@check("HD402", "loss-divergence", rank=30,
       thresholds=("trend_min_points", "smooth_fraction", "divergence_tail_fraction", "divergence_min_tail_points",
                   "divergence_factor", "divergence_min_rise"))
def loss_divergence(run: Run, t: Thresholds) -> list[Finding]:
    """The training loss climbs far above its best value and does not come back down.

    What it detects: The smoothed train `loss` (rolling median over `smooth_fraction` of the points) stays
    above `divergence_factor` x its running minimum over the last `divergence_tail_fraction` of the
    run (at least `divergence_min_tail_points` points), rising by at least `divergence_min_rise`. A
    spike that recovers is not divergence. Runs whose loss is not a cross-entropy (TRL
    preference/RL objectives, negative losses) are skipped.

    Why it happens: After reaching its best value the loss rises and stays high: the optimiser takes steps
    too large for the loss surface. The usual causes are a learning rate too high for the model and
    batch size (often right after warmup, when the rate peaks), no or weak gradient clipping
    (`max_grad_norm=0`), fp16 overflow, or a change in the data stream. A loss that settles near
    ln(vocabulary size) means the model has been destroyed and predicts a uniform distribution.

    Example: smoothed loss minimum 1.637 at step 1; the last 3 logged points read 10.37..10.37 (x6.3 the
    minimum, steps 8..10) and the loss ends above its starting value.

    Fix: Lower `learning_rate` by 2-10x (Higgs fine-tuning: 1e-5..1e-4), add or lengthen warmup
    (`warmup_ratio=0.05..0.1` or `warmup_steps` 100-500), keep `max_grad_norm=1.0`, prefer
    `bf16=True` over `fp16=True`; restart from the checkpoint saved nearest to the loss minimum rather
    than the last one.
    """
    if loss_not_cross_entropy(run) is not None:
        return []
    loss = finite(run.series("loss"))
    n = len(loss)
    if n < t.trend_min_points:
        return []
    k = max(int(math.ceil(n * t.divergence_tail_fraction)), t.divergence_min_tail_points)
    if k >= n or _tail_cannot_diverge(loss.to_numpy(), k, t):
        return []
    sm = smoothed(loss, t.smooth_fraction)
    head, tail = sm.iloc[: n - k], sm.iloc[n - k:]
    vmin = float(head.min())
    smin = int(head.idxmin())
    if not vmin > 0:
        return []
    limit = t.divergence_factor * vmin
    if not (tail > limit).all() or float(tail.min()) - vmin < t.divergence_min_rise:
        return []
    after = sm[sm.index > smin]
    rise_start = int(after[after > limit].index[0])
    start_val = float(sm.iloc[0])
    ev = [f"smoothed loss (rolling median over {smoothing_window(n, t.smooth_fraction)} logged points) reaches "
          f"its minimum {fmt(vmin)} at step {smin}",
          f"it exceeds {t.divergence_factor:g}x that minimum from step {rise_start} on and stays above it: the last "
          f"{k} logged points read {fmt(loss.iloc[-k:].min())}..{fmt(loss.iloc[-k:].max())} "
          f"(steps {int(loss.index[-k])}..{int(loss.index[-1])}, x{float(tail.iloc[-1]) / vmin:.1f} the minimum)"]
    if float(tail.iloc[-1]) > start_val:
        ev.append(f"the loss ends above its starting value ({fmt(start_val)} at step {int(sm.index[0])}): "
                  "all progress is lost")
    g = finite(run.series("grad_norm"))
    gr = g[(g.index >= smin) & (g.index <= rise_start)]
    if not gr.empty:
        ev.append(f"grad_norm between the minimum and the rise: up to {fmt(gr.max())} at step {int(gr.idxmax())} "
                  f"(run median {fmt(g.median())})")
    lr_at = value_at(finite(run.series("learning_rate")), rise_start)
    if lr_at is not None:
        ev.append(f"learning_rate at step {lr_at[0]}: {fmt(lr_at[1])}")
    mgn = run.arg("max_grad_norm")
    if mgn is not None:
        ev.append(f"TrainingArguments.max_grad_norm = {mgn}")
    return [finding(
        Severity.WARNING,
        f"Loss diverges: it climbs from {fmt(vmin)} (step {smin}) to {fmt(loss.iloc[-1])} and does not recover",
        evidence=ev, fix_detail=f"Here the loss minimum is at step {smin}.",
        steps=(smin, int(loss.index[-1])), metrics=("loss",))]


def _tail_cannot_diverge(v, k: int, t: Thresholds) -> bool:
    """True when bounds show that HD402 cannot fire, without the rolling median of the whole curve: every
    smoothed point of the head is at least the minimum of the raw points its windows cover, a smoothed point of
    the tail at most the maximum of its window. When some tail window's maximum is within divergence_factor x
    that minimum (or rises less than divergence_min_rise above it), the smoothed tail does not stay above the
    limit: what a healthy run shows, decided in O(n). False means only "compute it"."""
    n, f = len(v), t.divergence_factor
    if not 1 <= k < n or not isinstance(f, (int, float)) or not 0 <= f < math.inf:
        return False
    w = smoothing_window(n, t.smooth_fraction)
    low = float(v[: min(n, n - k + (w - 1) // 2)].min())  # the head's windows end (w - 1) // 2 after it
    high = float(centred_max(v, w, n - k).min())
    if not high < 1e300:  # (a + b) / 2 of two middle values could overflow where max does not
        return False
    return high <= f * low or high - low < t.divergence_min_rise


# ---- HD404 / HD409: the loss stops improving -----------------------------------------------------

@dataclass
class _Plateau:
    post: pd.Series  # the loss after warmup
    win: pd.Series  # ... over the last plateau_window_fraction of it
    first_third: float
    last_third: float
    since_warmup: float  # mean over the first points after warmup
    lr: pd.Series

    @property
    def improvement(self) -> float:
        return (self.first_third - self.last_third) / abs(self.first_third)

    @property
    def overall(self) -> float:
        p0 = self.since_warmup
        return (p0 - self.last_third) / abs(p0) if p0 != 0 else 0.0


def _plateau(run: Run, t: Thresholds) -> _Plateau | None:
    """The post-warmup loss when its last window stopped improving while the learning rate is still high."""
    if loss_not_cross_entropy(run) is not None:
        return None
    if _zero_grad(run, t) is not None or _flat_loss(run, t) is not None:
        return None  # HD401 / HD406
    loss = finite(run.series("loss"))
    post = loss[loss.index >= _warmup_end(run, t)]
    if len(post) < t.plateau_min_points:
        return None
    last = int(post.index[-1])
    wstart = last - (last - int(post.index[0])) * t.plateau_window_fraction
    win = post[post.index >= wstart]
    if len(win) < t.plateau_min_points or not (post.index < wstart).any():
        return None
    lr = finite(run.series("learning_rate"))
    if not lr.empty:
        peak = float(lr.max())
        if peak <= 0 or float(lr.iloc[-1]) < t.plateau_lr_fraction * peak:
            return None  # the schedule ran down: a flat end is what it is for
    third = max(1, len(win) // 3)
    a, b = float(win.iloc[:third].mean()), float(win.iloc[-third:].mean())
    if a == 0 or abs((a - b) / abs(a)) >= t.plateau_min_improvement:
        return None
    p0 = float(post.iloc[:max(1, min(max(1, len(post) // 3), third))].mean())
    return _Plateau(post, win, a, b, p0, lr)


def _plateau_evidence(run: Run, t: Thresholds, p: _Plateau) -> list[str]:
    last = int(p.win.index[-1])
    ev = [f"train loss over the last {t.plateau_window_fraction:.0%} of the run after warmup (steps "
          f"{int(p.win.index[0])}..{last}, {len(p.win)} logged points): mean of the first third {fmt(p.first_third)}, "
          f"of the last third {fmt(p.last_third)} ({p.improvement:+.1%} improvement)",
          f"since warmup (step {int(p.post.index[0])}, loss {fmt(p.since_warmup)}) the loss improved by {p.overall:.1%}"]
    if not p.lr.empty:
        peak, final = float(p.lr.max()), float(p.lr.iloc[-1])
        ev.append(f"learning_rate at the last logged step {int(p.lr.index[-1])}: {fmt(final)} "
                  f"({final / peak:.0%} of its peak {fmt(peak)})")
    ms = run.state.max_steps if run.state else None
    if ms and last < ms:
        ev.append(f"the logs stop at step {last} of max_steps {ms}")
    return ev


# the plateau window, and the exclusions of HD401/HD406's conditions
_PLATEAU_THRESHOLDS = ("plateau_window_fraction", "plateau_min_improvement", "plateau_min_points",
                       "plateau_lr_fraction", "lr_rel_tolerance", "zero_grad_share", "trend_min_points",
                       "flat_loss_rel_range")


@check("HD404", "loss-plateau", rank=40, thresholds=_PLATEAU_THRESHOLDS)
def loss_plateau(run: Run, t: Thresholds) -> list[Finding]:
    """The training loss stopped improving while the learning rate is still high.

    What it detects: After warmup (the lr peak), the mean train `loss` over the first and last third of the
    last `plateau_window_fraction` of the run differ by less than `plateau_min_improvement`
    (relative), with at least `plateau_min_points` points in that window, while the learning rate has
    not run down (final lr at least `plateau_lr_fraction` x its peak: a schedule that decays to ~0
    flattens the loss on purpose), and the loss did improve since warmup (else HD409). Info. Not for
    non-cross-entropy objectives, nor when HD401/HD406 report zero gradients or a flat loss.

    Why it happens: The loss stopped going down while the optimiser still takes full-size steps: further
    steps at this learning rate buy nothing. Either the model has learned what it can from this data
    (a capacity limit such as a small LoRA rank or few target modules), the rate is too high to
    descend further and the loss bounces around a level, or the labels carry little signal (for Higgs
    Audio, few unmasked audio labels per batch).

    Example: loss over the last 30% of the run (steps 700..1000, 31 points): 2.114 -> 2.109 (0.2% better);
    learning_rate at the end 2e-05 (100% of its peak).

    Fix: Stop earlier (`max_steps`) or let the rate decay (`lr_scheduler_type="cosine"` or `"linear"`); if
    the loss bounces, lower `learning_rate`; if it is flat, raise the LoRA rank (`r=16..32`,
    `lora_alpha=2*r`) or add target modules, and check how many labels per batch are not -100.
    """
    p = _plateau(run, t)
    if p is None or p.overall < t.plateau_min_improvement:
        return []
    last = int(p.win.index[-1])
    return [finding(
        Severity.INFO,
        f"Loss plateau: no improvement over the last {t.plateau_window_fraction:.0%} of the run (steps "
        f"{int(p.win.index[0])}..{last})" + (f" while the learning rate is still {fmt(float(p.lr.iloc[-1]))}"
                                             if not p.lr.empty else ""),
        evidence=_plateau_evidence(run, t, p), steps=(int(p.win.index[0]), last), metrics=("loss", "learning_rate"))]


@check("HD409", "loss-plateau", rank=40, thresholds=_PLATEAU_THRESHOLDS)
def no_improvement_since_warmup(run: Run, t: Thresholds) -> list[Finding]:
    """The training loss has not improved since warmup: the run learns (almost) nothing.

    What it detects: The plateau of HD404 (the last `plateau_window_fraction` of the run after warmup
    improves by less than `plateau_min_improvement` while the learning rate is still at least
    `plateau_lr_fraction` x its peak), where in addition the loss at the end is within
    `plateau_min_improvement` of the loss right after warmup. A warning. Not for non-cross-entropy
    objectives, nor when HD401/HD406 report zero gradients or a flat loss.

    Why it happens: The updates are applied (gradients and learning rate are nonzero) but do not lower the
    loss: closer to no learning than to convergence. The learning rate is too low for the task, the
    updates reach too few parameters (LoRA `target_modules` that match a few layers, a tiny rank), the
    labels carry almost no signal (nearly every label -100; for Higgs Audio few unmasked audio labels),
    or the logged loss is not the model's (see the nan-masked rules).

    Example: loss 6.93 right after warmup (step 1) and 6.93 over the last 30% of the run (steps 140..200);
    learning_rate 1e-05 at the end (100% of its peak).

    Fix: Check the learning rate (Higgs fine-tuning: 1e-5..1e-4) and what is trained
    (`model.print_trainable_parameters()`, `target_modules` that match the model's layer names, a LoRA
    rank of 16..32); count the labels per batch that are not -100; make sure `compute_loss` returns
    this step's loss.
    """
    p = _plateau(run, t)
    if p is None or p.overall >= t.plateau_min_improvement:
        return []
    return [finding(
        Severity.WARNING,
        f"Loss has not improved since warmup (step {int(p.post.index[0])}): stuck near {fmt(p.last_third)}",
        evidence=_plateau_evidence(run, t, p), steps=(int(p.win.index[0]), int(p.win.index[-1])),
        metrics=("loss", "learning_rate"))]


# ---- symptom -> cause links ------------------------------------------------------------------------
# Code-level links hold for any finding of the cause's code, so only links that are true whatever the
# cause finding says are declared here: a plateau is what a masked NaN or a model that does not learn
# looks like; a divergence that ends in NaN is the same event as the non-finite loss HD301 reports.
# HD401 and HD406 set caused_by themselves (HD304 when the zero-gradient loss is a fallback constant, HD501
# when the learning rate is 0 throughout): an HD501 finding of a rate that reaches 0 late in the run does not
# explain a loss flat from the start, and HD304's isolated-step info explains nothing about a missing
# backward().
for _symptom in ("HD404", "HD409"):
    causes(_symptom, "HD302", "HD303", "HD304", "HD401")
causes("HD402", "HD301", "HD302", "HD303")
