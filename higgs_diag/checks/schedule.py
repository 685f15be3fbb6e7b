"""Learning-rate schedule: the logged `learning_rate` against the configured one."""
from __future__ import annotations

import math

import pandas as pd

from ..config import Thresholds
from ..diagnosis import Finding, Severity
from ..run.model import Run
from . import check, finding
from ._util import finite, fmt, is_higgs_run, state_or_arg

# Schedulers whose rate should fall after warmup (transformers' SchedulerType values).
_DECAYING = {"linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt", "cosine_with_min_lr"}


def _sched_name(run: Run) -> str | None:
    v = run.arg("lr_scheduler_type")
    if v is None:
        return None
    s = str(v)
    return s.split(".")[-1].lower()  # "SchedulerType.LINEAR" -> "linear"


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _planned_steps(run: Run) -> int | None:
    ms = state_or_arg(run, "max_steps", "max_steps")
    ms = _num(ms)
    return int(ms) if ms and ms > 0 else None


def _planned_warmup(run: Run, max_steps: int | None) -> tuple[int | None, str]:
    """Warmup steps as the Trainer computes them (`get_warmup_steps`): warmup_steps if > 0, else
    ceil(warmup_ratio x max_steps)."""
    ws = _num(run.arg("warmup_steps"))
    if ws is not None and ws > 0:
        return int(ws), f"warmup_steps={int(ws)}"
    wr = _num(run.arg("warmup_ratio"))
    if wr is not None and wr > 0 and max_steps:
        return int(math.ceil(wr * max_steps)), f"warmup_ratio={wr:g} x max_steps {max_steps}"
    if ws is not None or wr is not None:
        return 0, "no warmup configured"
    return None, ""


def _expected_factor(sched: str | None, step: int, warmup: int, total: int) -> float | None:
    """The lr multiplier transformers' schedule `sched` gives after `step` optimizer steps (what the
    Trainer logs at that step), or None for a schedule not modelled here."""
    if sched not in ("constant", "constant_with_warmup", "linear", "cosine"):
        return None
    if sched == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if sched == "constant_with_warmup":
        return 1.0
    if total <= warmup:
        return None
    progress = (step - warmup) / max(1, total - warmup)
    if sched == "linear":
        return max(0.0, 1 - progress)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))


def _zero_runs(lr: pd.Series) -> tuple[list[int], list[int], list[int]]:
    """Steps with lr == 0: leading, interior/trailing (stuck) and the single benign last point."""
    z = (lr == 0.0).to_numpy()
    steps = lr.index.to_numpy()
    n = len(z)
    lead = 0
    while lead < n and z[lead]:
        lead += 1
    leading = [int(s) for s in steps[:lead]]
    rest = [int(steps[i]) for i in range(lead, n) if z[i]]
    benign_last: list[int] = []
    # a linear/cosine schedule logs exactly 0 at its last step: one final zero after a nonzero rate
    if rest and rest[-1] == int(steps[-1]) and n >= 2 and not z[n - 2]:
        benign_last = [rest.pop()]
    return leading, rest, benign_last


@check("HD501", "lr-schedule", rank=25)
def lr_schedule(run: Run, t: Thresholds) -> list[Finding]:
    """The learning rate the run actually used does not follow the schedule it was configured with.

    What it detects: From the logged `learning_rate` and, when the TensorBoard `args` summary is there, the
    TrainingArguments: a rate of 0 on many logged steps (all of them: critical; from some step to
    the end or in the middle: warning; only the first few: info), ignoring the single final 0 a
    linear/cosine schedule logs at its last step; warmup as long as the run (the peak is never
    reached); a peak at another step than the configured warmup or another value than
    `learning_rate`; no decay after warmup under a decaying `lr_scheduler_type` (linear,
    cosine, ...) when the schedule should have lowered it by `lr_decay_expected_min`. For Higgs
    Audio runs only: a peak rate outside [`lr_recommended_min`, `lr_recommended_max`] (info).

    Why it happens: A scheduler built with the wrong `num_training_steps` (per-epoch steps, or before
    `gradient_accumulation_steps` was accounted for) reaches 0 early and stays there;
    `warmup_steps` larger than `max_steps`; a custom optimizer/scheduler passed through
    `optimizers=(...)` whose rate ignores `learning_rate`; a scheduler that is never stepped.
    With DeepSpeed fp16 the scheduler does not step while the loss scaler skips overflow steps,
    so the first logged rates can be 0.

    Example: learning_rate is 0.0 at 40 logged steps from step 610 to 1000 (the run's last 39%); max_steps
    1000, lr_scheduler_type linear.

    Fix: Let the Trainer build the scheduler (`lr_scheduler_type`, `warmup_steps`/`warmup_ratio`,
    `max_steps`) or build yours with `num_training_steps=trainer.state.max_steps` counted in
    optimizer steps; keep warmup to 1-10% of the run (Higgs: 100-500 steps, 500-1000 for Arabic);
    Higgs fine-tuning rates: 5e-5..1e-4 (1e-5..3e-5 for Arabic).
    """
    lr = finite(run.series("learning_rate"))
    if lr.empty:
        return []
    out: list[Finding] = []
    first, last = int(lr.index[0]), int(lr.index[-1])
    peak = float(lr.max())
    sched = _sched_name(run)
    max_steps = _planned_steps(run)
    warmup, warmup_src = _planned_warmup(run, max_steps)
    cfg_lr = _num(run.arg("learning_rate"))
    logging_steps = _num(state_or_arg(run, "logging_steps", "logging_steps"))
    # logging_steps < 1 is a ratio of the run (TrainingArguments accepts floats)
    if logging_steps is not None and logging_steps < 1 and max_steps:
        logging_steps = max(1.0, logging_steps * max_steps)
    sched_line = f"lr_scheduler_type {sched}" if sched else "lr_scheduler_type not in the logs"

    # ---- a rate of zero ------------------------------------------------------------------------
    leading, stuck, _benign = _zero_runs(lr)
    if len(lr) >= 2 and peak == 0.0:
        out.append(finding(
            Severity.CRITICAL,
            f"learning_rate is 0.0 at all {len(lr)} logged steps: the optimizer never changes the weights",
            evidence=[f"learning_rate == 0.0 at every logged step ({first}..{last})",
                      f"TrainingArguments.learning_rate = {run.arg('learning_rate')}" if cfg_lr is not None
                      else "TrainingArguments not in the logs", sched_line],
            explanation=(
                "Every optimizer step multiplies the update by the learning rate: at 0.0 nothing is learned, "
                "whatever the loss and gradients say. The configured rate is 0, or a custom scheduler "
                "returns a factor of 0 (e.g. a warmup that never starts, or num_training_steps=0)."),
            fix=("Set learning_rate (Higgs fine-tuning: 5e-5..1e-4) and let the Trainer build the scheduler, or "
                 "build yours with num_training_steps=trainer.state.max_steps and warmup below it."),
            steps=(first, last), metrics=("learning_rate",)))
        return out
    if len(stuck) >= t.lr_zero_min_points:
        s0, s1 = stuck[0], stuck[-1]
        to_end = s1 == last
        nz_after = lr[(lr.index > s0) & (lr != 0.0)]
        ev = [f"learning_rate == 0.0 at {len(stuck)} of {len(lr)} logged steps, from step {s0} to {s1}"
              + (f" (the last {(last - s0) / max(1, last - first):.0%} of the logged run)" if to_end else ""),
              f"peak learning_rate {fmt(peak)} at step {int(lr.idxmax())}", sched_line]
        if max_steps:
            ev.append(f"max_steps {max_steps}")
        if not to_end and not nz_after.empty:
            ev.append(f"the rate is nonzero again at step {int(nz_after.index[0])} ({fmt(nz_after.iloc[0])})")
        out.append(finding(
            Severity.WARNING,
            (f"learning_rate reaches 0.0 at step {s0} and stays there for {len(stuck)} logged steps"
             if to_end else f"learning_rate drops to 0.0 on {len(stuck)} logged steps between {s0} and {s1}"),
            evidence=ev,
            explanation=(
                "The schedule ran out before the run did: every step after the rate hit 0 costs compute and "
                "changes nothing. This is what a scheduler built with too small a num_training_steps does (steps "
                "counted per epoch, or before gradient_accumulation_steps / the number of GPUs were accounted for), "
                "or a resumed run whose scheduler state belongs to a shorter run."),
            fix=("Let the Trainer create the scheduler from max_steps/num_train_epochs, or build it with "
                 "num_training_steps=trainer.state.max_steps (optimizer steps); when resuming with a longer "
                 "max_steps, start a new schedule instead of restoring scheduler.pt."),
            steps=(s0, s1), metrics=("learning_rate", "loss")))
    elif len(leading) >= t.lr_zero_min_points and len(leading) < len(lr):
        out.append(finding(
            Severity.INFO,
            f"learning_rate is 0.0 on the first {len(leading)} logged steps ({leading[0]}..{leading[-1]})",
            evidence=[f"learning_rate == 0.0 at logged steps {leading[0]}..{leading[-1]}, first nonzero "
                      f"{fmt(lr[lr != 0.0].iloc[0])} at step {int(lr[lr != 0.0].index[0])}", sched_line],
            explanation=(
                "The first updates were applied with a rate of 0. Under DeepSpeed with fp16 the scheduler does "
                "not step while the loss scaler skips overflow steps, so a few zeros at the start are expected; "
                "a long stretch means many batches were spent without learning."),
            fix="Nothing to do for a few steps; for a long stretch, use bf16=True or a smaller initial loss scale.",
            steps=(leading[0], leading[-1]), metrics=("learning_rate",)))

    # ---- warmup and peak -----------------------------------------------------------------------
    peak_step = int(lr[lr >= peak - abs(peak) * t.lr_rel_tolerance].index[0])
    finished = max_steps is not None and (run.last_step or last) >= max_steps
    # still climbing at the last logged step (a constant rate after warmup is not "rising")
    rising_to_end = (len(lr) >= t.trend_min_points and bool((lr.diff().dropna() >= 0).all())
                     and float(lr.iloc[-1]) > float(lr.iloc[-2]))
    if warmup is not None and max_steps and warmup >= max_steps:
        out.append(finding(
            Severity.WARNING,
            f"Warmup ({warmup} steps) is as long as the run ({max_steps} steps): the peak rate is never reached",
            evidence=[f"{warmup_src} -> {warmup} warmup steps >= max_steps {max_steps}",
                      f"highest logged learning_rate {fmt(peak)} at step {peak_step}"
                      + (f" = {peak / cfg_lr:.0%} of learning_rate {fmt(cfg_lr)}" if cfg_lr else ""), sched_line],
            explanation=(
                "The scheduler raises the rate linearly over the warmup steps; when warmup is longer than the "
                "whole run, training ends while the rate is still climbing, so the model trains at a fraction "
                "of the configured rate and the decay phase never happens."),
            fix=(f"Set warmup_steps well below max_steps (1-10% of the run; Higgs: 100-500 steps) or use "
                 f"warmup_ratio=0.05; with max_steps={max_steps}, e.g. warmup_steps={max(1, max_steps // 20)}."),
            steps=(first, last), metrics=("learning_rate",)))
    elif warmup is None and rising_to_end and finished:
        out.append(finding(
            Severity.WARNING,
            f"learning_rate rises until the last step ({last}): warmup is longer than the run",
            evidence=[f"learning_rate rises from {fmt(lr.iloc[0])} (step {first}) to {fmt(lr.iloc[-1])} (step {last}) "
                      "and never decays", f"the run reached max_steps {max_steps}"],
            explanation=(
                "The rate climbs over the whole run, so training ended inside warmup: the model trained at a "
                "fraction of the intended rate and the decay phase never happened."),
            fix="Set warmup_steps well below max_steps (1-10% of the run) or use warmup_ratio=0.05.",
            steps=(first, last), metrics=("learning_rate",)))
    elif warmup is not None and max_steps and warmup < max_steps and last >= warmup:
        gran = max(1.0, logging_steps or 1.0)
        tol = max(2 * gran, t.lr_rel_tolerance * warmup + gran)
        if abs(peak_step - max(warmup, first)) > tol and not stuck:
            out.append(finding(
                Severity.INFO,
                f"learning_rate peaks at step {peak_step}, but the configured warmup ends at step {warmup}",
                evidence=[f"{warmup_src} -> warmup ends at step {warmup}",
                          f"logged learning_rate peaks at {fmt(peak)} at step {peak_step}",
                          f"logging_steps {int(gran)}", sched_line],
                explanation=(
                    "The rate the run used does not follow the configured warmup: a custom scheduler or optimizer "
                    "(passed via optimizers=(...) or built in create_scheduler) ignores warmup_steps/warmup_ratio, "
                    "or the scheduler counts steps differently (per micro-batch instead of per optimizer step)."),
                fix=("Let the Trainer build the scheduler from warmup_steps/warmup_ratio, or pass the same warmup to "
                     "your scheduler (num_warmup_steps) counted in optimizer steps."),
                steps=(first, peak_step), metrics=("learning_rate",)))
    if cfg_lr and cfg_lr > 0 and peak > 0 and sched != "reduce_lr_on_plateau":
        # what the configured schedule gives at the logged peak step (the first logged point may already
        # be past a short warmup, or still inside a long one)
        factor = (_expected_factor(sched, peak_step, warmup, max_steps)
                  if warmup is not None and max_steps else None)
        expected = cfg_lr * factor if factor else None
        # compare like with like: the value logged at peak_step (within tolerance of the maximum) with
        # what the schedule gives at that same step
        at_peak = float(lr.loc[peak_step]) if expected else peak
        rel = at_peak / (expected or cfg_lr)
        off = (abs(rel - 1) > t.lr_rel_tolerance) if expected else (peak > cfg_lr * (1 + t.lr_rel_tolerance))
        if off:
            out.append(finding(
                Severity.INFO,
                f"Logged peak learning_rate {fmt(peak)} differs from TrainingArguments.learning_rate {fmt(cfg_lr)}",
                evidence=[f"peak logged learning_rate {fmt(peak)} at step {peak_step} = {peak / cfg_lr:.3g}x the "
                          f"configured learning_rate {fmt(cfg_lr)}"
                          + (f"; the {sched} schedule gives {fmt(expected)} at that step" if expected else ""),
                          sched_line],
                explanation=(
                    "After warmup every transformers schedule starts from learning_rate; a different peak means the "
                    "optimizer was built elsewhere (optimizers=(...), DeepSpeed's config, a custom create_optimizer) "
                    "with its own rate, so the rate in TrainingArguments is not the one the run used."),
                fix="Set the rate in one place: TrainingArguments.learning_rate, or the custom optimizer, not both.",
                steps=(peak_step, peak_step), metrics=("learning_rate",)))

    # ---- decay -----------------------------------------------------------------------------------
    if sched in _DECAYING and max_steps and not stuck:
        post = lr[lr.index >= peak_step]
        w = warmup if warmup is not None else peak_step
        expected = _expected_factor(sched, last, w, max_steps) if last >= w else None
        observed = float(post.min()) / peak if peak > 0 else 1.0
        if (len(post) >= t.trend_min_points and expected is not None
                and 1 - expected >= t.lr_decay_expected_min and 1 - observed < t.lr_rel_tolerance):
            out.append(finding(
                Severity.WARNING,
                f"No decay: learning_rate stays at {fmt(peak)} after warmup under lr_scheduler_type {sched}",
                evidence=[f"learning_rate {fmt(post.min())}..{fmt(post.max())} over {len(post)} logged steps "
                          f"({int(post.index[0])}..{last})",
                          f"a {sched} schedule over max_steps {max_steps} with {w} warmup steps would be at "
                          f"{expected:.0%} of the peak by step {last}"],
                explanation=(
                    "The configured scheduler should have lowered the rate by now, but the logged rate is constant: "
                    "the scheduler is not stepped (a custom training loop or optimizer_step override), or the "
                    "Trainer was given optimizers=(optimizer, scheduler) with a constant scheduler, or "
                    "num_training_steps is far larger than the run."),
                fix=("Let the Trainer create and step the scheduler (do not pass a scheduler, or pass one built with "
                     "num_training_steps=trainer.state.max_steps); if a constant rate is intended, set "
                     "lr_scheduler_type='constant' or 'constant_with_warmup' so the intent is explicit."),
                steps=(int(post.index[0]), last), metrics=("learning_rate",)))

    # ---- Higgs recommendation ----------------------------------------------------------------------
    if peak > 0 and is_higgs_run(run) and not (t.lr_recommended_min <= peak <= t.lr_recommended_max):
        out.append(finding(
            Severity.INFO,
            f"Peak learning_rate {fmt(peak)} is outside the range used for Higgs Audio fine-tuning "
            f"({fmt(t.lr_recommended_min)}..{fmt(t.lr_recommended_max)})",
            evidence=[f"peak logged learning_rate {fmt(peak)} at step {peak_step}",
                      f"recommended range {fmt(t.lr_recommended_min)}..{fmt(t.lr_recommended_max)} "
                      "(thresholds lr_recommended_min / lr_recommended_max)"],
            explanation=(
                "Reported Higgs Audio v2 fine-tuning runs (zero-shot voice cloning, 800 h, 8 GPUs) used 5e-5..1e-4, "
                "and 1e-5..3e-5 for Arabic; far higher rates destabilise the audio codebook heads, far lower ones "
                "barely move a LoRA adapter."),
            fix=("Start from learning_rate=5e-5 (1e-5..3e-5 for a new language such as Arabic) with warmup_steps "
                 "100-500, and adjust from the audio loss curve."),
            steps=(peak_step, peak_step), metrics=("learning_rate",)))
    return out
