"""Optimisation: does the run learn, does it stay stable, does it generalise.

Symptoms here (a flat loss, a plateau, a divergence) often have a root cause found by another check
(a masked NaN, a zero learning rate): the `causes` declarations at the bottom link them.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from ..config import Thresholds
from ..diagnosis import Finding, Severity
from ..run.model import Run
from . import causes, check, finding
from ._util import fmt, finite, loss_not_cross_entropy, smoothing_window
from .config_checks import best_metric_name


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


def _lr_peak(run: Run, t: Thresholds) -> tuple[float, int] | None:
    """Peak learning rate and the first step at which it is reached (within lr_rel_tolerance)."""
    lr = finite(run.series("learning_rate"))
    if lr.empty:
        return None
    peak = float(lr.max())
    if peak <= 0:
        return (peak, int(lr.index[0]))
    reached = lr[lr >= peak * (1 - t.lr_rel_tolerance)]
    return peak, int(reached.index[0])


def _warmup_end(run: Run, t: Thresholds) -> int:
    """The step after which the run is past warmup: the lr peak when lr is logged, else the configured
    warmup_steps, else the first logged step."""
    pk = _lr_peak(run, t)
    if pk is not None and pk[0] > 0:
        return pk[1]
    ws = run.arg("warmup_steps")
    if isinstance(ws, (int, float)) and ws > 0:
        return int(ws)
    loss = run.series("loss")
    return int(loss.index[0]) if not loss.empty else 0


def _smooth(s: pd.Series, t: Thresholds) -> pd.Series:
    s = finite(s)
    w = smoothing_window(len(s), t.smooth_fraction)
    return s.rolling(w, center=True, min_periods=1).median() if w > 1 else s


def _last_session(run: Run, metric: str) -> tuple[pd.Series, int]:
    """`run.series(metric)` restricted to the points logged after the last time the step went back in
    reading order (one logging dir holding several runs or sessions), and how many points were left out.
    Sparse series such as evaluations from separate runs cannot be merged by step into one curve."""
    s = run.series(metric)
    df = run.scalars
    if s.empty or df.empty:
        return s, 0
    sub = df[df["metric"] == metric]
    counts = sub.groupby("source")["step"].size()
    best = max(counts.index, key=lambda src: (counts[src], src == "trainer_state"))
    steps = sub.loc[sub["source"] == best, "step"].to_numpy()
    back = np.where(np.diff(steps) < 0)[0]
    if not len(back):
        return s, 0
    keep = sub[sub["source"] == best].iloc[int(back[-1]) + 1:]
    keep = keep.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    out = pd.Series(keep["value"].to_numpy(dtype="float64"),
                    index=pd.Index(keep["step"].to_numpy(dtype="int64"), name="step"), name=metric)
    return out, int(len(s) - len(out))


def _value_at(s: pd.Series, step: int) -> tuple[int, float] | None:
    """The last point of `s` at or before `step` (or the first point after it)."""
    if s.empty:
        return None
    before = s[s.index <= step]
    if not before.empty:
        return int(before.index[-1]), float(before.iloc[-1])
    return int(s.index[0]), float(s.iloc[0])


# ---- HD401 ---------------------------------------------------------------------------------------

@check("HD401", "no-learning", rank=20)
def no_learning(run: Run, t: Thresholds) -> list[Finding]:
    """The model is not being trained: zero gradients, or a loss that does not move at all.

    What it detects: `grad_norm` exactly 0.0 on at least `zero_grad_share` (default 90%) of the logged steps
    (critical); or a `loss` that is identical, or varies by at most `flat_loss_rel_range` of its
    magnitude, over the whole run while `grad_norm` is finite and nonzero or not logged (warning).

    Why it happens: A `training_step` override that returns the loss without calling
    `self.accelerator.backward(loss)`; no trainable parameter (a frozen base model whose PEFT
    `target_modules` match nothing, `requires_grad=False` everywhere); a loss rebuilt with
    `torch.tensor(loss.item())` or computed under `torch.no_grad()`, so it has no graph. A flat
    loss with nonzero gradients means the update never reaches the weights: a learning rate of 0,
    an optimizer built over other parameters (created before the PEFT wrap), or a logged loss that
    is not the model's.

    Example: grad_norm is exactly 0.0 at 50 of 50 logged steps (steps 1..50); loss 6.931..6.932 over the run.

    Fix: Do not override `training_step`, or call `self.accelerator.backward(loss)` in it; check
    `sum(p.numel() for p in model.parameters() if p.requires_grad) > 0` (PEFT:
    `model.print_trainable_parameters()`); return the model's loss tensor from `compute_loss`
    without `.item()`/`.detach()`; make sure `learning_rate` > 0 and that the optimizer is
    created by the Trainer after the model is wrapped.
    """
    zg = _zero_grad(run, t)
    loss = finite(run.series("loss"))
    lr = finite(run.series("learning_rate"))
    if zg is not None:
        g, n0, share = zg
        zeros = g[g == 0.0]
        ev = [f"grad_norm is exactly 0.0 at {n0} of {len(g)} logged steps ({share:.0%}; "
              f"steps {int(zeros.index[0])}..{int(zeros.index[-1])})"]
        nz = g[g != 0.0]
        if not nz.empty:
            ev.append(f"nonzero grad_norm at {len(nz)} step(s), e.g. step {int(nz.index[0])}: {fmt(nz.iloc[0])}")
        if not loss.empty:
            ev.append(f"loss over the run: first {fmt(loss.iloc[0])} (step {int(loss.index[0])}), "
                      f"last {fmt(loss.iloc[-1])} (step {int(loss.index[-1])}), range "
                      f"{fmt(loss.min())}..{fmt(loss.max())}")
        if not lr.empty:
            ev.append(f"learning_rate is {fmt(lr.max())} at its peak: the optimizer had a rate to apply "
                      "but no gradient" if lr.max() > 0 else "learning_rate is 0.0 throughout")
        # a loss pinned to a fallback constant on the zero-gradient steps is HD302's finding
        lz = loss[loss.index.isin(zeros.index)]
        const = any(int((lz == float(c)).sum()) >= t.masked_min_steps for c in t.suspicious_constants)
        if const:
            ev.append("the loss on these steps is one of the constants a fallback writes (see nan-masked)")
        return [finding(
            Severity.CRITICAL,
            f"No gradient: grad_norm is exactly 0.0 on {n0} of {len(g)} logged steps",
            caused_by="HD302" if const else None,
            evidence=ev,
            explanation=(
                "The Trainer logs the gradient norm it clips just before optimizer.step(). Exactly 0.0 means "
                "no parameter received a gradient: backward() was never called (a training_step override "
                "that returns the loss without self.accelerator.backward(loss)), no parameter requires "
                "grad, or the loss has no graph (rebuilt from .item(), computed under torch.no_grad(), or a "
                "constant substituted for it). The weights never change; every checkpoint equals the "
                "starting model."),
            fix=(
                "Remove the training_step override or make it call self.accelerator.backward(loss) and "
                "return loss.detach(); check that sum(p.numel() for p in model.parameters() if "
                "p.requires_grad) > 0 (PEFT: model.print_trainable_parameters(), and target_modules that "
                "match the model's layer names); return the model's loss tensor from compute_loss."),
            steps=(int(zeros.index[0]), int(zeros.index[-1])),
            metrics=("grad_norm", "loss"),
        )]

    if loss_not_cross_entropy(run) is not None:
        return []
    flat = _flat_loss(run, t)
    if flat is None:
        return []
    g = run.series("grad_norm")
    gf = finite(g)
    if not g.empty and (gf.empty or float(gf.median()) == 0.0 or len(gf) < len(g) / 2):
        return []  # non-finite or zero gradients: HD301/HD302 (or the zero-grad rule) explain it
    lo, hi = float(flat.min()), float(flat.max())
    identical = lo == hi
    ev = [(f"loss is identical ({fmt(lo)}) at all {len(flat)} logged steps" if identical else
           f"loss stays within {fmt(lo)}..{fmt(hi)} (relative range {(hi - lo) / abs(float(flat.median())):.1e}) "
           f"at all {len(flat)} logged steps")
          + f" ({int(flat.index[0])}..{int(flat.index[-1])})"]
    if identical and any(lo == float(c) for c in t.suspicious_constants):
        ev.append(f"{fmt(lo)} is one of the constants a fallback writes instead of a real loss")
    if not gf.empty:
        ev.append(f"grad_norm is finite and nonzero: median {fmt(gf.median())}, range {fmt(gf.min())}..{fmt(gf.max())}")
    else:
        ev.append("grad_norm is not logged")
    if not lr.empty:
        ev.append(f"learning_rate {fmt(lr.min())}..{fmt(lr.max())}")
    lr_zero = not lr.empty and float(lr.max()) == 0.0
    return [finding(
        Severity.WARNING,
        f"Loss does not move: {'identical' if identical else 'flat'} over all {len(flat)} logged steps",
        caused_by="HD501" if lr_zero else None,
        evidence=ev,
        explanation=(
            "Gradients are computed but the loss never changes, so the updates do not reach the weights "
            "that produce it: a learning rate of 0, an optimizer built over other parameters (created "
            "before a PEFT wrap, or custom param groups), a logged value that is not the model's loss (a "
            "constant or a cached number in a custom compute_loss), or a model whose output is detached "
            "from the trainable parameters."),
        fix=(
            "Check that learning_rate > 0 in the logs, let the Trainer create the optimizer after the model "
            "is wrapped (or pass optimizers=(opt, sched) built from model.parameters() that require grad), "
            "and return the loss computed from this step's outputs in compute_loss."),
        steps=(int(flat.index[0]), int(flat.index[-1])),
        metrics=("loss", "grad_norm"),
    )]


# ---- HD402 ---------------------------------------------------------------------------------------

@check("HD402", "loss-divergence", rank=30)
def loss_divergence(run: Run, t: Thresholds) -> list[Finding]:
    """The training loss climbs far above its best value and does not come back down.

    What it detects: The smoothed train `loss` (rolling median over `smooth_fraction` of the points) stays above
    `divergence_factor` x its running minimum over the last `divergence_tail_fraction` of the
    run (at least `divergence_min_tail_points` points), rising by at least
    `divergence_min_rise`. A spike that recovers is not divergence. Runs whose loss is not a
    cross-entropy (TRL preference/RL objectives, negative losses) are skipped.

    Why it happens: The learning rate is too high for the model and batch size (often right after warmup, when the
    rate peaks), fp16 overflow, gradient clipping disabled (`max_grad_norm=0`), or a change in the
    data stream. A loss that settles at ln(vocab size) means the model has been destroyed and
    predicts a uniform distribution.

    Example: smoothed loss minimum 1.637 at step 1; the last 3 logged points read 10.37..10.37 (x6.3 the
    minimum, steps 8..10) and the loss ends above its starting value.

    Fix: Lower `learning_rate` (Higgs fine-tuning: 1e-5..1e-4), add warmup (`warmup_ratio=0.05` or
    `warmup_steps` 100-500), keep `max_grad_norm=1.0`, prefer `bf16=True`; restart from the
    checkpoint saved nearest to the loss minimum.
    """
    if loss_not_cross_entropy(run) is not None:
        return []
    loss = finite(run.series("loss"))
    n = len(loss)
    if n < t.trend_min_points:
        return []
    sm = _smooth(loss, t)
    k = max(int(math.ceil(n * t.divergence_tail_fraction)), t.divergence_min_tail_points)
    if k >= n:
        return []
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
    lr_at = _value_at(finite(run.series("learning_rate")), rise_start)
    if lr_at is not None:
        ev.append(f"learning_rate at step {lr_at[0]}: {fmt(lr_at[1])}")
    mgn = run.arg("max_grad_norm")
    if mgn is not None:
        ev.append(f"TrainingArguments.max_grad_norm = {mgn}")
    return [finding(
        Severity.WARNING,
        f"Loss diverges: it climbs from {fmt(vmin)} (step {smin}) to {fmt(loss.iloc[-1])} and does not recover",
        evidence=ev,
        explanation=(
            "After reaching its best value the training loss rises and stays high to the end of the logs: "
            "the optimiser is taking steps too large for the loss surface. The usual causes are a learning "
            "rate too high for the model and batch size (often right after warmup, where the rate peaks), "
            "no or weak gradient clipping, fp16 overflow, or a change in the data. A loss that settles near "
            "ln(vocabulary size) means the model now predicts a uniform distribution."),
        fix=(
            "Lower learning_rate (by 2-10x; Higgs Audio fine-tuning uses 1e-5..1e-4), add or lengthen warmup "
            "(warmup_ratio=0.05..0.1), keep max_grad_norm=1.0, use bf16=True rather than fp16=True, and "
            f"restart from the checkpoint saved nearest to step {smin} rather than the last one."),
        steps=(smin, int(loss.index[-1])),
        metrics=("loss",),
    )]


# ---- HD403 ---------------------------------------------------------------------------------------

@check("HD403", "grad-explosion", rank=32)
def grad_explosion(run: Run, t: Thresholds) -> list[Finding]:
    """Gradient-norm spikes far above the run's own recent level.

    What it detects: Logged `grad_norm` above `grad_spike_factor` (10x) its trailing rolling median over
    `grad_spike_window` logged points (after `grad_spike_min_history` points of history; exact
    zeros are left out of the median). Never an absolute bound: healthy runs sit anywhere from 0.3
    to 2e5. Warning when a spike damages the run: the median loss over the next
    `loss_jump_points` logged points exceeds `loss_jump_factor` x its trailing median and rises by
    at least `loss_jump_min_rise` (a noisy single batch is not a jump), or when gradient clipping
    is disabled. Info for spikes the run absorbs, even frequent ones (at least
    `grad_spike_frequent_min` and `grad_spike_frequent_share` of the points): a well-fit
    classifier or a noisy SFT run shows many such spikes without harm.

    Why it happens: Outlier batches (very long sequences, for Higgs Audio very long audio segments, rare tokens),
    a learning rate too high, fp16 loss-scale effects. The Trainer logs the norm before clipping;
    with `max_grad_norm=1.0` the applied update stays bounded, so isolated spikes are harmless.

    Example: grad_norm exceeds 10x its rolling median at 1 of 648 logged steps: step 30 84.88 (median 2.78,
    x30); the loss does not jump after it.

    Fix: Keep `max_grad_norm=1.0` (never 0), lower `learning_rate` or lengthen warmup when the loss
    jumps after spikes, and inspect the batches at the spike steps (cap audio/sequence length in the
    collator).
    """
    g = finite(run.series("grad_norm"))
    g = g[g > 0]
    n = len(g)
    if n <= t.grad_spike_min_history:
        return []
    ref = g.shift(1).rolling(t.grad_spike_window, min_periods=t.grad_spike_min_history).median()
    ratio = g / ref
    spike = (ref > 0) & (g > t.grad_spike_factor * ref)
    spikes = g[spike]
    if spikes.empty:
        return []

    ce = loss_not_cross_entropy(run) is None
    jumps: list[str] = []
    loss = finite(run.series("loss"))
    if ce and len(loss) > t.grad_spike_min_history:
        lref = loss.shift(1).rolling(t.grad_spike_window, min_periods=t.grad_spike_min_history).median()
        for s in spikes.index:
            later = loss[loss.index >= s].iloc[: t.loss_jump_points]
            before = lref[lref.index >= s]
            if later.empty or before.empty:
                continue
            r = float(before.iloc[0])
            lv = float(later.median())
            if np.isfinite(r) and r > 0 and lv > t.loss_jump_factor * r and lv - r >= t.loss_jump_min_rise:
                jumps.append(f"spike at step {int(s)}: loss median {fmt(lv)} over the next {len(later)} logged "
                             f"point(s) vs {fmt(r)} before")
    frequent = len(spikes) >= max(t.grad_spike_frequent_min, math.ceil(t.grad_spike_frequent_share * n))
    mgn = run.arg("max_grad_norm")
    no_clip = mgn is not None and (not isinstance(mgn, (int, float)) or mgn <= 0)
    sev = Severity.WARNING if (jumps or no_clip) else Severity.INFO

    top = ratio[spike].sort_values(ascending=False).index[:5]
    listed = "; ".join(f"step {int(s)} {fmt(g[s])} (median {fmt(ref[s])}, x{ratio[s]:.0f})" for s in sorted(top))
    ev = [f"grad_norm exceeds {t.grad_spike_factor:g}x its trailing median over {t.grad_spike_window} logged points "
          f"at {len(spikes)} of {n} logged steps: {listed}"
          + (f" (+{len(spikes) - len(top)} more)" if len(spikes) > len(top) else ""),
          f"run median grad_norm {fmt(g.median())}"]
    if jumps:
        ev.append(f"the loss jumps after {len(jumps)} spike(s): " + "; ".join(jumps[:3]))
    elif ce and not loss.empty:
        ev.append("the loss does not jump after any spike: the run absorbed them")
    elif not ce:
        ev.append("the loss is not a cross-entropy (preference/RL objective): loss jumps not judged")
    if frequent:
        ev.append(f"spikes are frequent: {len(spikes)} of {n} logged steps")
    if mgn is not None:
        ev.append(f"TrainingArguments.max_grad_norm = {mgn}" + (" (clipping disabled)" if no_clip else ""))
    after_last = g[g.index > spikes.index[-1]]
    if not after_last.empty:
        ev.append(f"after the last spike (step {int(spikes.index[-1])}) grad_norm has median "
                  f"{fmt(after_last.median())}")
    if sev == Severity.WARNING:
        title = (f"Gradient spikes: grad_norm above {t.grad_spike_factor:g}x its rolling median at {len(spikes)} "
                 "step(s)" + (", followed by loss jumps" if jumps else " with gradient clipping disabled"))
    else:
        title = (f"Gradient spikes: grad_norm above {t.grad_spike_factor:g}x its rolling median at {len(spikes)} "
                 f"step(s){' (frequent)' if frequent else ''}, absorbed by the run")
    return [finding(
        sev, title, evidence=ev,
        explanation=(
            "The gradient norm the Trainer logs is measured before clipping. Spikes come from outlier batches "
            "(very long sequences or, for Higgs Audio, very long audio segments, rare tokens, a misclassified "
            "sample when the loss is already near 0) and are harmless when max_grad_norm clips the update and "
            "the loss does not react. Spikes followed by a lasting jump in the loss mean the updates are "
            "destabilising the model: the learning rate is too high for some batches or clipping is off."),
        fix=(
            "Keep max_grad_norm=1.0 (never 0); if the loss jumps after spikes, lower learning_rate or lengthen "
            "warmup (warmup_ratio=0.05..0.1), and inspect the batches at the spike steps (cap the sequence/audio "
            "length in the collator, drop corrupt samples)."),
        steps=(int(spikes.index[0]), int(spikes.index[-1])),
        metrics=("grad_norm", "loss"),
    )]


# ---- HD404 ---------------------------------------------------------------------------------------

@check("HD404", "loss-plateau", rank=40)
def loss_plateau(run: Run, t: Thresholds) -> list[Finding]:
    """The training loss stopped improving while the learning rate is still high.

    What it detects: After warmup (the lr peak), the mean train `loss` over the first and last third of the last
    `plateau_window_fraction` of the run differ by less than `plateau_min_improvement`
    (relative), with at least `plateau_min_points` points in that window, while the learning
    rate has not run down (final lr at least `plateau_lr_fraction` x its peak: a schedule that
    decays to ~0 flattens the loss on purpose). Info; warning when the loss has not improved by
    `plateau_min_improvement` since warmup at all. Not for non-CE objectives, nor when HD401
    already reports a flat loss or zero gradients.

    Why it happens: The model has learned what it can from the data at this learning rate (capacity reached, LoRA
    rank too small, too few trainable modules), the learning rate is too high to descend further
    (the loss bounces around a level) or too low to move; or the labels give little signal (for
    Higgs Audio: too few unmasked audio labels).

    Example: loss over the last 30% of the run (steps 700..1000, 31 points): 2.114 -> 2.109 (0.2% better);
    learning_rate at the end 2e-05 (100% of its peak).

    Fix: Stop earlier (`max_steps`) or let the schedule decay (`lr_scheduler_type="cosine"`); try a
    lower `learning_rate` if the loss bounces, a higher LoRA rank (`r=16..32`) or more target
    modules if it is flat; check how many labels are unmasked per batch.
    """
    if loss_not_cross_entropy(run) is not None:
        return []
    if _zero_grad(run, t) is not None or _flat_loss(run, t) is not None:
        return []
    loss = finite(run.series("loss"))
    start = _warmup_end(run, t)
    post = loss[loss.index >= start]
    if len(post) < t.plateau_min_points:
        return []
    last = int(post.index[-1])
    span = last - int(post.index[0])
    wstart = last - span * t.plateau_window_fraction
    win = post[post.index >= wstart]
    before = post[post.index < wstart]
    if len(win) < t.plateau_min_points or before.empty:
        return []
    lr = finite(run.series("learning_rate"))
    lr_line = None
    if not lr.empty:
        peak = float(lr.max())
        final = float(lr.iloc[-1])
        if peak <= 0 or final < t.plateau_lr_fraction * peak:
            return []
        lr_line = (f"learning_rate at the last logged step {int(lr.index[-1])}: {fmt(final)} "
                   f"({final / peak:.0%} of its peak {fmt(peak)})")
    third = max(1, len(win) // 3)
    a, b = float(win.iloc[:third].mean()), float(win.iloc[-third:].mean())
    if a == 0:
        return []
    improvement = (a - b) / abs(a)
    if abs(improvement) >= t.plateau_min_improvement:
        return []
    p_third = max(1, len(post) // 3)
    p0 = float(post.iloc[:max(1, min(p_third, third))].mean())
    overall = (p0 - b) / abs(p0) if p0 != 0 else 0.0
    stuck = overall < t.plateau_min_improvement
    ev = [f"train loss over the last {t.plateau_window_fraction:.0%} of the run after warmup (steps "
          f"{int(win.index[0])}..{last}, {len(win)} logged points): mean of the first third {fmt(a)}, "
          f"of the last third {fmt(b)} ({improvement:+.1%} improvement)",
          f"since warmup (step {int(post.index[0])}, loss {fmt(p0)}) the loss improved by {overall:.1%}"]
    if lr_line:
        ev.append(lr_line)
    ms = run.state.max_steps if run.state else None
    if ms and last < ms:
        ev.append(f"the logs stop at step {last} of max_steps {ms}")
    sev = Severity.WARNING if stuck else Severity.INFO
    title = (f"Loss has not improved since warmup (step {int(post.index[0])}): stuck near {fmt(b)}" if stuck else
             f"Loss plateau: no improvement over the last {t.plateau_window_fraction:.0%} of the run (steps "
             f"{int(win.index[0])}..{last})"
             + (f" while the learning rate is still {fmt(float(lr.iloc[-1]))}" if not lr.empty else ""))
    return [finding(
        sev, title, evidence=ev,
        explanation=(
            "The loss stopped going down while the optimiser still takes full-size steps: further steps at "
            "this learning rate buy nothing. Either the model has learned what it can from this data (a "
            "capacity limit such as a small LoRA rank or few target modules), the rate is too high to descend "
            "further and the loss bounces around a level, or the labels carry little signal (for Higgs Audio, "
            "few unmasked audio labels per batch)." +
            (" The loss has barely moved since warmup, which is closer to no learning than to convergence."
             if stuck else "")),
        fix=(
            "Stop earlier (max_steps) or let the rate decay (lr_scheduler_type='cosine' or 'linear'); if the loss "
            "bounces, lower learning_rate; if it is flat, raise the LoRA rank (r=16..32, lora_alpha=2*r) or add "
            "target modules, and check how many labels per batch are not -100."),
        steps=(int(win.index[0]), last),
        metrics=("loss", "learning_rate"),
    )]


# ---- HD405 ---------------------------------------------------------------------------------------

# eval_* keys that measure the evaluation itself, not the model's quality
_NOT_QUALITY = ("_runtime", "_per_second", "num_tokens", "gen_len", "_epoch", "_step", "_samples")
_LOWER_IS_BETTER = re.compile(r"loss|wer|cer|err|perplexity|ppl|mse|mae|rmse|distance|der", re.I)


def _best_metric_name(run: Run) -> tuple[str | None, str]:
    """(metric_for_best_model as a logged eval_* name, how it was learned)."""
    name = best_metric_name(run.args)
    if name:
        m = run.arg("metric_for_best_model")
        return name, (f"TrainingArguments.metric_for_best_model = {m!r}" if m else
                      "load_best_model_at_end=True without metric_for_best_model (defaults to loss)")
    st = run.state
    bm = st.best_metric if st else None
    if isinstance(bm, bool) or not isinstance(bm, (int, float)) or not math.isfinite(bm):
        return None, ""
    ck_step = None
    if st.best_model_checkpoint:
        mm = re.search(r"checkpoint-(\d+)", str(st.best_model_checkpoint))
        ck_step = int(mm.group(1)) if mm else None
    candidates = []
    for metric in run.metrics:
        if not metric.startswith("eval_") or any(k in metric for k in _NOT_QUALITY):
            continue
        s = finite(run.series(metric))
        if s.empty:
            continue
        close = s[np.isclose(s.to_numpy(), bm, rtol=1e-6, atol=1e-12)]
        if close.empty:
            continue
        candidates.append((ck_step is not None and ck_step in close.index, metric == "eval_loss", metric))
    if not candidates:
        return None, ""
    candidates.sort(reverse=True)
    return candidates[0][2], f"inferred: trainer_state best_metric {fmt(bm)} is a logged {candidates[0][2]} value"


def _greater_is_better(run: Run, metric: str) -> bool:
    g = run.arg("greater_is_better")
    if isinstance(g, bool):
        return g
    return not _LOWER_IS_BETTER.search(metric[5:] if metric.startswith("eval_") else metric)


@check("HD405", "overfitting", rank=45)
def overfitting(run: Run, t: Thresholds) -> list[Finding]:
    """Evaluation loss rises after its minimum while the training loss keeps falling.

    What it detects: `eval_loss` has at least `overfit_min_evals` evaluations after its minimum, and both the last
    evaluation and the median of the last `overfit_min_evals` exceed the minimum by more than
    `overfit_rise_fraction`. Warning when the train loss keeps falling (or is not logged); info
    when `metric_for_best_model` (from the args, or inferred from `best_metric`) is another
    metric such as WER or accuracy that keeps improving after the eval_loss minimum (common for
    Whisper-style fine-tuning: the loss gets over-confident while the task metric improves), or when
    the train loss does not fall either. Reports whether `best_model_checkpoint` is the eval_loss
    minimum.

    Why it happens: Too many epochs over a small dataset, a learning rate too high for fine-tuning, a large LoRA rank
    without dropout: the model memorises the training samples (for Higgs Audio, the training
    speakers and utterances) and loses calibration on held-out audio.

    Example: eval_loss minimum 0.2088 at step 12000, then 3 evaluations above it, last 0.2393 at step 15000
    (+14.6%); train loss 0.153 -> 0.121 over the same steps; best_model_checkpoint checkpoint-15000
    is not the eval_loss minimum.

    Fix: `load_best_model_at_end=True` with `metric_for_best_model="eval_loss"` (or your task metric)
    and `save_steps` a multiple of `eval_steps`; `EarlyStoppingCallback(early_stopping_patience=3)`;
    fewer epochs, lower `learning_rate`, `weight_decay=0.01`, LoRA `lora_dropout=0.1`; more data.
    """
    ev_all, dropped = _last_session(run, "eval_loss")
    ev_loss = finite(ev_all)
    if len(ev_loss) < max(2, t.overfit_min_evals):
        return []
    vmin = float(ev_loss.min())
    smin = int(ev_loss.idxmin())
    if not vmin > 0:
        return []
    after = ev_loss[ev_loss.index > smin]
    # the rise spans overfit_min_evals consecutive evaluations counting the minimum itself
    if len(after) < t.overfit_min_evals - 1 or after.empty:
        return []
    limit = vmin * (1 + t.overfit_rise_fraction)
    last = float(after.iloc[-1])
    if not (last > limit and float(after.iloc[-max(1, t.overfit_min_evals - 1):].median()) > limit):
        return []
    slast = int(after.index[-1])
    ev = [f"eval_loss reaches its minimum {fmt(vmin)} at step {smin} ({len(ev_loss)} evaluations); the "
          f"{len(after)} evaluations after it are higher, the last {fmt(last)} at step {slast} "
          f"(+{(last - vmin) / vmin:.1%})"]
    if dropped:
        ev.append(f"only the last session's evaluations are compared: the logs hold {dropped} earlier eval_loss "
                  "point(s) of other sessions (see resume-discontinuity)")

    train_falls: bool | None = None
    tl = finite(run.series("loss"))
    if loss_not_cross_entropy(run) is None and len(tl) >= 2:
        sm = _smooth(tl, t) if len(tl) >= t.trend_min_points else tl
        at = _value_at(sm, smin)
        end = (int(sm.index[-1]), float(sm.iloc[-1]))
        if at is not None and at[0] < end[0]:
            train_falls = end[1] < at[1] * (1 - t.plateau_min_improvement)
            ev.append(f"smoothed train loss {fmt(at[1])} at step {at[0]} -> {fmt(end[1])} at step {end[0]} "
                      + ("(still falling)" if train_falls else "(not falling)"))

    best_metric, how = _best_metric_name(run)
    other_improves = False
    if best_metric:
        ev.append(f"metric for the best model: {best_metric} ({how})")
        if best_metric != "eval_loss":
            bs = finite(run.series(best_metric))
            if not bs.empty:
                gib = _greater_is_better(run, best_metric)
                bstep = int(bs.idxmax() if gib else bs.idxmin())
                bval = float(bs.max() if gib else bs.min())
                other_improves = bstep > smin
                ev.append(f"{best_metric} is best ({fmt(bval)}) at step {bstep}, "
                          + ("after the eval_loss minimum: it keeps improving while eval_loss rises"
                             if other_improves else "not after the eval_loss minimum: it stopped improving too"))
    if not best_metric:
        # no best-model metric known: say which other eval metrics still improve after the minimum
        for metric in run.metrics:
            if (not metric.startswith("eval_") or "loss" in metric
                    or any(k in metric for k in _NOT_QUALITY)):
                continue
            ms = finite(run.series(metric))
            if len(ms) < 2:
                continue
            gib = _greater_is_better(run, metric)
            bstep = int(ms.idxmax() if gib else ms.idxmin())
            if bstep > smin:
                best = ms.max() if gib else ms.min()
                ev.append(f"{metric} keeps improving after the eval_loss minimum (best {fmt(best)} "
                          f"at step {bstep}): if it is the metric you select by, judge by it")
    st = run.state
    if st and st.best_model_checkpoint:
        mm = re.search(r"checkpoint-(\d+)", str(st.best_model_checkpoint))
        if mm:
            ck = int(mm.group(1))
            is_min = ck == smin
            at_ck = ev_loss.get(ck)
            ev.append(f"best_model_checkpoint {st.best_model_checkpoint} (step {ck}) "
                      + ("is the eval_loss minimum" if is_min else
                         f"is not the eval_loss minimum (step {smin})"
                         + (f"; eval_loss there {fmt(at_ck)}" if at_ck is not None else "")))
    if run.arg("load_best_model_at_end") is not None:
        ev.append(f"TrainingArguments.load_best_model_at_end = {run.arg('load_best_model_at_end')}")

    if other_improves:
        sev = Severity.INFO
        title = (f"eval_loss rises after step {smin} (+{(last - vmin) / vmin:.0%}) while {best_metric}, the metric "
                 "for the best model, keeps improving")
    elif train_falls is False:
        sev = Severity.INFO
        title = (f"eval_loss rises after step {smin} (+{(last - vmin) / vmin:.0%}) but the train loss does not "
                 "fall either")
    else:
        sev = Severity.WARNING
        title = (f"Overfitting: eval_loss rises from {fmt(vmin)} (step {smin}) to {fmt(last)} (step {slast})"
                 + (" while the train loss keeps falling" if train_falls else ""))
    return [finding(
        sev, title, evidence=ev,
        explanation=(
            "The held-out loss stopped improving and rises while the model keeps fitting the training data: "
            "it is memorising the training samples (for Higgs Audio, the training speakers and utterances) "
            "rather than learning what carries over. Checkpoints after the eval_loss minimum generalise "
            "worse by this measure." +
            (f" Here the best model is chosen by {best_metric}, which still improves: a rising eval_loss "
             "with an improving task metric is common (the model grows over-confident on its mistakes), so "
             "judge by that metric." if other_improves else "")),
        fix=(
            "Keep the best checkpoint: load_best_model_at_end=True, metric_for_best_model='eval_loss' (or your "
            "task metric) and save_steps a multiple of eval_steps; stop early with "
            "EarlyStoppingCallback(early_stopping_patience=3); train fewer epochs or with a lower learning_rate; "
            "add regularisation (weight_decay=0.01, LoRA lora_dropout=0.1) or more data."),
        steps=(smin, slast),
        metrics=("eval_loss", "loss") + ((best_metric,) if best_metric and best_metric != "eval_loss" else ()),
    )]


# ---- symptom -> cause links ------------------------------------------------------------------------
# Code-level links hold for any finding of the cause's code, so only links that are true whatever the
# cause finding says are declared here: a plateau is what a masked NaN or a model that does not learn
# looks like; a divergence that ends in NaN is the same event as the non-finite loss HD301 reports.
# HD401 sets caused_by itself (HD302 when its zero-gradient loss is a fallback constant, HD501 when the
# learning rate is 0 throughout): HD501's other findings (a warmup mismatch, the Higgs lr range) and
# HD302's isolated-step info explain nothing about a missing backward().
causes("HD404", "HD302", "HD401")
causes("HD402", "HD301", "HD302")
