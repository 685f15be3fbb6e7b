"""Learning-rate schedule: the logged `learning_rate` against the configured one, one rule per condition
(HD501-HD508). :func:`schedule` reads the run once (logged rate, scheduler, warmup, peak, zero stretches)
and every rule judges that one reading."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
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
    lead = n if z.all() else int(np.argmin(z))  # the first nonzero rate
    leading = steps[:lead].tolist()
    rest = steps[lead:][z[lead:]].tolist()
    benign_last: list[int] = []
    # a linear/cosine schedule logs exactly 0 at its last step: one final zero after a nonzero rate
    if rest and rest[-1] == int(steps[-1]) and n >= 2 and not z[n - 2]:
        benign_last = [rest.pop()]
    return leading, rest, benign_last


@dataclass(frozen=True)
class Schedule:
    """What the schedule rules judge, read from a run once."""

    lr: pd.Series  # the finite logged learning_rate
    first: int
    last: int
    peak: float
    peak_step: int  # first logged step within lr_rel_tolerance of the peak
    sched: str | None
    max_steps: int | None
    warmup: int | None  # warmup steps as the Trainer computes them; None when the args do not say
    warmup_src: str
    cfg_lr: float | None
    logging_steps: float | None
    leading: list[int]  # logged steps with lr == 0 before the first nonzero rate
    stuck: list[int]  # later logged steps with lr == 0 (the single final 0 of a decaying schedule excluded)
    finished: bool  # the run reached max_steps
    rising_to_end: bool  # still climbing at the last logged step

    @property
    def sched_line(self) -> str:
        return f"lr_scheduler_type {self.sched}" if self.sched else "lr_scheduler_type not in the logs"


_cache: list = [None, None, None]  # (weakref to the run, key, Schedule): the rules of one run read it once


def schedule(run: Run, t: Thresholds) -> Schedule | None:
    """The run's :class:`Schedule` (None without a finite logged learning_rate), cached for the last run."""
    key = (t, id(run.scalars), id(run.state), dict(run.args or {}))
    ref, k, value = _cache
    if ref is not None and ref() is run and k == key:
        return value
    value = _read_schedule(run, t)
    _cache[:] = [weakref.ref(run), key, value]
    return value


def _read_schedule(run: Run, t: Thresholds) -> Schedule | None:
    lr = finite(run.series("learning_rate"))
    if lr.empty:
        return None
    first, last = int(lr.index[0]), int(lr.index[-1])
    peak = float(lr.max())
    max_steps = _planned_steps(run)
    warmup, warmup_src = _planned_warmup(run, max_steps)
    logging_steps = _num(state_or_arg(run, "logging_steps", "logging_steps"))
    # logging_steps < 1 is a ratio of the run (TrainingArguments accepts floats)
    if logging_steps is not None and logging_steps < 1 and max_steps:
        logging_steps = max(1.0, logging_steps * max_steps)
    leading, stuck, _benign = _zero_runs(lr)
    return Schedule(
        lr=lr, first=first, last=last, peak=peak,
        peak_step=int(lr[lr >= peak - abs(peak) * t.lr_rel_tolerance].index[0]),
        sched=_sched_name(run), max_steps=max_steps, warmup=warmup, warmup_src=warmup_src,
        cfg_lr=_num(run.arg("learning_rate")), logging_steps=logging_steps, leading=leading, stuck=stuck,
        finished=max_steps is not None and (run.last_step or last) >= max_steps,
        # a constant rate after warmup is not "rising"
        rising_to_end=(len(lr) >= t.trend_min_points and bool((lr.diff().dropna() >= 0).all())
                       and float(lr.iloc[-1]) > float(lr.iloc[-2])))


# ---- a rate of zero ------------------------------------------------------------------------------------------

@check("HD501", "lr-schedule", rank=25, thresholds=("lr_zero_min_points",))
def lr_stuck_at_zero(run: Run, t: Thresholds) -> list[Finding]:
    """The learning rate is 0.0 on many logged steps: those steps change no weight.

    What it detects: a logged `learning_rate` of exactly 0.0 at every logged step (critical), or on at
    least `lr_zero_min_points` logged steps after the rate was nonzero, from some step to the end or in
    the middle of the run (warning). The single final 0 a linear/cosine schedule logs at its last step
    is not counted; zeros only at the start are lr-leading-zeros (HD502).

    Why it happens: every optimizer step multiplies the update by the learning rate, so at 0.0 nothing
    is learned, whatever the loss and gradients say. At every step: the configured rate is 0, or a
    custom scheduler returns a factor of 0 (a warmup that never starts, `num_training_steps=0`). From
    some step on: the schedule ran out before the run did, as a scheduler built with too small a
    `num_training_steps` does (steps counted per epoch, or before `gradient_accumulation_steps` / the
    number of GPUs were accounted for), or a resumed run restored the scheduler state of a shorter run.

    Example: `learning_rate is 0.0 at 40 of 100 logged steps (610..1000)`; max_steps 1000,
    lr_scheduler_type linear.

    Fix: set `learning_rate` (Higgs fine-tuning: 5e-5..1e-4) and let the Trainer create the scheduler
    from `max_steps`/`num_train_epochs`, or build yours with `num_training_steps=trainer.state.max_steps`
    (optimizer steps) and a warmup below it; when resuming with a longer `max_steps`, start a new
    schedule instead of restoring `scheduler.pt`.
    """
    s = schedule(run, t)
    if s is None:
        return []
    lr = s.lr
    if len(lr) >= 2 and s.peak == 0.0:
        zeros, sev = [int(x) for x in lr.index], Severity.CRITICAL
        ev = [f"learning_rate == 0.0 at every logged step ({s.first}..{s.last})",
              f"TrainingArguments.learning_rate = {run.arg('learning_rate')}" if s.cfg_lr is not None
              else "TrainingArguments not in the logs", s.sched_line]
    elif len(s.stuck) >= t.lr_zero_min_points:
        zeros, sev = s.stuck, Severity.WARNING
        s0, s1 = zeros[0], zeros[-1]
        ev = [f"learning_rate == 0.0 at {len(zeros)} of {len(lr)} logged steps, from step {s0} to {s1}"
              + (f" (the last {(s.last - s0) / max(1, s.last - s.first):.0%} of the logged run)" if s1 == s.last
                 else ""),
              f"peak learning_rate {fmt(s.peak)} at step {int(lr.idxmax())}", s.sched_line]
        if s.max_steps:
            ev.append(f"max_steps {s.max_steps}")
        nz_after = lr[(lr.index > s0) & (lr != 0.0)]
        if s1 != s.last and not nz_after.empty:
            ev.append(f"the rate is nonzero again at step {int(nz_after.index[0])} ({fmt(nz_after.iloc[0])})")
    else:
        return []
    return [finding(sev, f"learning_rate is 0.0 at {len(zeros)} of {len(lr)} logged steps ({zeros[0]}..{zeros[-1]})",
                    evidence=ev, steps=(zeros[0], zeros[-1]), metrics=("learning_rate", "loss"))]


@check("HD502", "lr-schedule", rank=55, thresholds=("lr_zero_min_points",))
def lr_leading_zeros(run: Run, t: Thresholds) -> list[Finding]:
    """The learning rate is 0.0 on the first logged steps.

    What it detects: at least `lr_zero_min_points` logged steps with `learning_rate` 0.0 at the start of
    the run, followed by a nonzero rate (info).

    Why it happens: the first updates were applied with a rate of 0. Under DeepSpeed with fp16 the
    scheduler does not step while the loss scaler skips overflow steps, so a few zeros at the start are
    expected; a long stretch means many batches were spent without learning.

    Example: `learning_rate is 0.0 on the first 6 logged steps (1..6)`, first nonzero 2e-6 at step 7.

    Fix: nothing to do for a few steps; for a long stretch, use `bf16=True` or a smaller initial loss
    scale (DeepSpeed `initial_scale_power`).
    """
    s = schedule(run, t)
    if s is None or not (t.lr_zero_min_points <= len(s.leading) < len(s.lr)):
        return []
    nz = s.lr[s.lr != 0.0]
    return [finding(
        Severity.INFO,
        f"learning_rate is 0.0 on the first {len(s.leading)} logged steps ({s.leading[0]}..{s.leading[-1]})",
        evidence=[f"learning_rate == 0.0 at logged steps {s.leading[0]}..{s.leading[-1]}, first nonzero "
                  f"{fmt(nz.iloc[0])} at step {int(nz.index[0])}", s.sched_line],
        steps=(s.leading[0], s.leading[-1]), metrics=("learning_rate",))]


# ---- warmup and peak -----------------------------------------------------------------------------------------

@check("HD503", "lr-schedule", rank=26)
def warmup_as_long_as_the_run(run: Run, t: Thresholds) -> list[Finding]:
    """The configured warmup is as long as the run: the peak learning rate is never reached.

    What it detects: from the TrainingArguments, warmup steps as the Trainer computes them
    (`warmup_steps` when > 0, else `ceil(warmup_ratio x max_steps)`) of at least `max_steps`.
    Without the arguments, lr-rises-to-the-end (HD504) sees the same fault in the logged rate.

    Why it happens: `warmup_steps` copied from a longer run, or `max_steps` lowered for a short run. The
    scheduler raises the rate linearly over the warmup steps; when warmup is as long as the whole run,
    training ends while the rate is still climbing, so the model trains at a fraction of the configured
    rate and the decay phase never happens.

    Example: `Warmup (1000 steps) is as long as the run (150 steps)`; highest logged learning_rate
    3e-4 = 15% of learning_rate 2e-3.

    Fix: set `warmup_steps` well below `max_steps` (1-10% of the run; Higgs: 100-500 steps, 500-1000 for
    Arabic) or use `warmup_ratio=0.05`.
    """
    s = schedule(run, t)
    if s is None or s.warmup is None or not s.max_steps or s.warmup < s.max_steps:
        return []
    return [finding(
        Severity.WARNING,
        f"Warmup ({s.warmup} steps) is as long as the run ({s.max_steps} steps): the peak rate is never reached",
        evidence=[f"{s.warmup_src} -> {s.warmup} warmup steps >= max_steps {s.max_steps}",
                  f"highest logged learning_rate {fmt(s.peak)} at step {s.peak_step}"
                  + (f" = {s.peak / s.cfg_lr:.0%} of learning_rate {fmt(s.cfg_lr)}" if s.cfg_lr else ""),
                  s.sched_line],
        fix_detail=f"With max_steps={s.max_steps}, e.g. warmup_steps={max(1, s.max_steps // 20)}.",
        steps=(s.first, s.last), metrics=("learning_rate",))]


@check("HD504", "lr-schedule", rank=26, thresholds=("trend_min_points",))
def lr_rises_to_the_end(run: Run, t: Thresholds) -> list[Finding]:
    """The logged learning rate rises until the last step of a finished run: warmup is longer than the run.

    What it detects: when the TrainingArguments do not say how long warmup is, a logged `learning_rate`
    (at least `trend_min_points` points) that never falls and still rises at the last logged step of a
    run that reached `max_steps`. A rate that is constant after warmup does not count.

    Why it happens: the rate climbs over the whole run, so training ended inside warmup (`warmup_steps`
    at least `max_steps`, or a custom scheduler's warmup counted in micro-batches): the model trained at
    a fraction of the intended rate and the decay phase never happened.

    Example: `learning_rate rises until the last step (150)`: from 2e-6 at step 1 to 3e-4 at step 150;
    the run reached max_steps 150.

    Fix: set `warmup_steps` well below `max_steps` (1-10% of the run) or use `warmup_ratio=0.05`; log the
    TrainingArguments (`report_to=["tensorboard"]`) so the configured warmup can be compared.
    """
    s = schedule(run, t)
    if s is None or s.warmup is not None or not s.rising_to_end or not s.finished:
        return []
    return [finding(
        Severity.WARNING, f"learning_rate rises until the last step ({s.last}): warmup is longer than the run",
        evidence=[f"learning_rate rises from {fmt(s.lr.iloc[0])} (step {s.first}) to {fmt(s.lr.iloc[-1])} "
                  f"(step {s.last}) and never decays", f"the run reached max_steps {s.max_steps}"],
        steps=(s.first, s.last), metrics=("learning_rate",))]


@check("HD505", "lr-schedule", rank=50, thresholds=("lr_rel_tolerance",))
def peak_step_differs_from_warmup(run: Run, t: Thresholds) -> list[Finding]:
    """The learning rate peaks at another step than the configured warmup ends.

    What it detects: the first logged step within `lr_rel_tolerance` of the peak rate is further from
    the end of the configured warmup than `max(2 x logging_steps, lr_rel_tolerance x warmup +
    logging_steps)` (info; only for a warmup shorter than the run and a rate not stuck at 0).

    Why it happens: the rate the run used does not follow the configured warmup: a custom scheduler or
    optimizer (passed via `optimizers=(...)` or built in `create_scheduler`) ignores
    `warmup_steps`/`warmup_ratio`, or the scheduler counts steps differently (per micro-batch instead
    of per optimizer step).

    Example: `learning_rate peaks at step 50, but the configured warmup ends at step 10`.

    Fix: let the Trainer build the scheduler from `warmup_steps`/`warmup_ratio`, or pass the same warmup
    to your scheduler (`num_warmup_steps`) counted in optimizer steps.
    """
    s = schedule(run, t)
    if (s is None or s.peak <= 0 or s.warmup is None or not s.max_steps or s.warmup >= s.max_steps
            or s.last < s.warmup or s.stuck):
        return []
    gran = max(1.0, s.logging_steps or 1.0)
    tol = max(2 * gran, t.lr_rel_tolerance * s.warmup + gran)
    if abs(s.peak_step - max(s.warmup, s.first)) <= tol:
        return []
    return [finding(
        Severity.INFO,
        f"learning_rate peaks at step {s.peak_step}, but the configured warmup ends at step {s.warmup}",
        evidence=[f"{s.warmup_src} -> warmup ends at step {s.warmup}",
                  f"logged learning_rate peaks at {fmt(s.peak)} at step {s.peak_step}",
                  f"logging_steps {int(gran)}", s.sched_line],
        steps=(s.first, s.peak_step), metrics=("learning_rate",))]


@check("HD506", "lr-schedule", rank=50, thresholds=("lr_rel_tolerance",))
def peak_differs_from_learning_rate(run: Run, t: Thresholds) -> list[Finding]:
    """The logged peak learning rate is not the configured `learning_rate`.

    What it detects: the logged rate at its peak step differs by more than `lr_rel_tolerance` from what
    the configured schedule (constant, constant_with_warmup, linear, cosine) gives at that step; for
    other schedulers, a peak above `learning_rate` (info). Not for `reduce_lr_on_plateau`.

    Why it happens: after warmup every transformers schedule starts from `learning_rate`; a different
    peak means the optimizer was built elsewhere (`optimizers=(...)`, DeepSpeed's config, a custom
    `create_optimizer`) with its own rate, so the rate in TrainingArguments is not the one the run used.

    Example: `Logged peak learning_rate 1e-4 differs from TrainingArguments.learning_rate 2e-4`.

    Fix: set the rate in one place: `TrainingArguments.learning_rate`, or the custom optimizer, not both.
    """
    s = schedule(run, t)
    if s is None or not s.cfg_lr or s.cfg_lr <= 0 or s.peak <= 0 or s.sched == "reduce_lr_on_plateau":
        return []
    # what the configured schedule gives at the logged peak step (the first logged point may already be
    # past a short warmup, or still inside a long one); compare the value logged at that step with it
    factor = (_expected_factor(s.sched, s.peak_step, s.warmup, s.max_steps)
              if s.warmup is not None and s.max_steps else None)
    expected = s.cfg_lr * factor if factor else None
    if expected:
        off = abs(float(s.lr.loc[s.peak_step]) / expected - 1) > t.lr_rel_tolerance
    else:
        off = s.peak > s.cfg_lr * (1 + t.lr_rel_tolerance)
    if not off:
        return []
    return [finding(
        Severity.INFO,
        f"Logged peak learning_rate {fmt(s.peak)} differs from TrainingArguments.learning_rate {fmt(s.cfg_lr)}",
        evidence=[f"peak logged learning_rate {fmt(s.peak)} at step {s.peak_step} = {s.peak / s.cfg_lr:.3g}x the "
                  f"configured learning_rate {fmt(s.cfg_lr)}"
                  + (f"; the {s.sched} schedule gives {fmt(expected)} at that step" if expected else ""),
                  s.sched_line],
        steps=(s.peak_step, s.peak_step), metrics=("learning_rate",))]


# ---- decay ---------------------------------------------------------------------------------------------------

@check("HD507", "lr-schedule", rank=30, thresholds=("trend_min_points", "lr_rel_tolerance", "lr_decay_expected_min"))
def no_decay_after_warmup(run: Run, t: Thresholds) -> list[Finding]:
    """No decay: the learning rate stays at its peak although the configured scheduler decays.

    What it detects: under a decaying `lr_scheduler_type` (linear, cosine, polynomial, ...), the logged
    rate from its peak on (at least `trend_min_points` points) never falls by `lr_rel_tolerance`, while
    the configured schedule would have lowered it by at least `lr_decay_expected_min` by the last logged
    step (warning; not when the rate is stuck at 0).

    Why it happens: the configured scheduler should have lowered the rate by now, but the logged rate is
    constant: the scheduler is not stepped (a custom training loop or `optimizer_step` override), the
    Trainer was given `optimizers=(optimizer, scheduler)` with a constant scheduler, or
    `num_training_steps` is far larger than the run.

    Example: `No decay: learning_rate stays at 2e-4 after warmup under lr_scheduler_type cosine`; a
    cosine schedule over max_steps 200 with 10 warmup steps would be at 0% of the peak by step 200.

    Fix: let the Trainer create and step the scheduler (pass no scheduler, or one built with
    `num_training_steps=trainer.state.max_steps`); if a constant rate is intended, set
    `lr_scheduler_type="constant"` or `"constant_with_warmup"` so the intent is explicit.
    """
    s = schedule(run, t)
    if s is None or s.peak <= 0 or s.sched not in _DECAYING or not s.max_steps or s.stuck:
        return []
    post = s.lr[s.lr.index >= s.peak_step]
    w = s.warmup if s.warmup is not None else s.peak_step
    expected = _expected_factor(s.sched, s.last, w, s.max_steps) if s.last >= w else None
    observed = float(post.min()) / s.peak
    if (len(post) < t.trend_min_points or expected is None or 1 - expected < t.lr_decay_expected_min
            or 1 - observed >= t.lr_rel_tolerance):
        return []
    return [finding(
        Severity.WARNING,
        f"No decay: learning_rate stays at {fmt(s.peak)} after warmup under lr_scheduler_type {s.sched}",
        evidence=[f"learning_rate {fmt(post.min())}..{fmt(post.max())} over {len(post)} logged steps "
                  f"({int(post.index[0])}..{s.last})",
                  f"a {s.sched} schedule over max_steps {s.max_steps} with {w} warmup steps would be at "
                  f"{expected:.0%} of the peak by step {s.last}"],
        steps=(int(post.index[0]), s.last), metrics=("learning_rate",))]


# ---- Higgs recommendation --------------------------------------------------------------------------------------

@check("HD508", "lr-range", rank=60, scope="higgs", thresholds=("lr_recommended_min", "lr_recommended_max"))
def peak_lr_outside_higgs_range(run: Run, t: Thresholds) -> list[Finding]:
    """The peak learning rate is outside the range used for Higgs Audio fine-tuning.

    What it detects: for Higgs Audio runs only (model config or logged audio loss), a logged peak
    `learning_rate` outside [`lr_recommended_min`, `lr_recommended_max`] (info). The bundled trainer
    gives the same advice on the configured rate before a run (HD609).

    Why it happens: rates copied from text-LLM recipes or tiny test runs. Reported Higgs Audio v2
    fine-tuning runs (zero-shot voice cloning, 800 h, 8 GPUs) used 5e-5..1e-4, and 1e-5..3e-5 for
    Arabic; far higher rates destabilise the audio codebook heads, far lower ones barely move a LoRA
    adapter.

    Example: `Peak learning_rate 0.002 is outside the range used for Higgs Audio fine-tuning
    (1e-05..0.0001)`.

    Fix: start from `learning_rate=5e-5` (1e-5..3e-5 for a new language such as Arabic) with
    `warmup_steps` 100-500, and adjust from the audio loss curve.
    """
    s = schedule(run, t)
    if s is None or s.peak <= 0 or not is_higgs_run(run) or t.lr_recommended_min <= s.peak <= t.lr_recommended_max:
        return []
    return [finding(
        Severity.INFO,
        f"Peak learning_rate {fmt(s.peak)} is outside the range used for Higgs Audio fine-tuning "
        f"({fmt(t.lr_recommended_min)}..{fmt(t.lr_recommended_max)})",
        evidence=[f"peak logged learning_rate {fmt(s.peak)} at step {s.peak_step}",
                  f"recommended range {fmt(t.lr_recommended_min)}..{fmt(t.lr_recommended_max)} "
                  "(thresholds lr_recommended_min / lr_recommended_max)"],
        steps=(s.peak_step, s.peak_step), metrics=("learning_rate",))]
