"""Numerics: NaN/Inf in the logged losses and gradient norms, and NaN hidden behind a masked loss.

HD302 (nan-masked) explains the flat or zero loss curves that the optimisation checks would otherwise
report as their own problems (no-learning, plateau): the loss looks flat because what was logged is not
the loss. HD301 (the NaN itself), when it is visible, explains HD302.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..config import Thresholds
from ..diagnosis import Finding, Severity
from ..run.model import Run
from . import causes, check, finding
from ._util import fmt, loss_not_cross_entropy


def _loss_metrics(run: Run) -> list[str]:
    """Every logged series that is a loss (train, eval, per-component, the end-of-train summary)."""
    return [m for m in run.metrics if "loss" in m.lower()]


def _steps_text(steps, limit: int = 6) -> str:
    steps = [int(s) for s in steps]
    if len(steps) <= limit:
        return ", ".join(str(s) for s in steps)
    return ", ".join(str(s) for s in steps[:limit]) + f", ... ({len(steps)} in all)"


def _longest_run(mask: np.ndarray) -> tuple[int, int, int]:
    """Length, start index and end index (inclusive) of the longest run of True in `mask`."""
    best = (0, -1, -1)
    start = None
    for i, v in enumerate(list(mask) + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            if i - start > best[0]:
                best = (i - start, start, i - 1)
            start = None
    return best


@dataclass
class _Masked:
    """What HD302 found; HD301 uses it to leave the grad_norm points HD302 already explains."""

    # pattern A: grad_norm non-finite and the loss at the same step 0.0 or a frozen repeat
    nan_steps: list[int] = field(default_factory=list)
    zero_steps: list[int] = field(default_factory=list)
    frozen_steps: list[int] = field(default_factory=list)
    # pattern B: loss pinned to a suspicious constant while grad_norm is exactly 0
    const_value: float | None = None
    const_steps: list[int] = field(default_factory=list)
    const_longest: tuple[int, int, int] = (0, -1, -1)
    n_loss: int = 0

    @property
    def masked_steps(self) -> list[int]:
        return sorted(set(self.zero_steps) | set(self.frozen_steps))


def _find_masked(run: Run, t: Thresholds) -> _Masked:
    out = _Masked()
    loss = run.series("loss")
    grad = run.series("grad_norm")
    out.n_loss = int(len(loss))
    if loss.empty or grad.empty:
        return out
    both = pd.concat([loss.rename("loss"), grad.rename("grad")], axis=1, join="inner")
    if both.empty:
        return out
    lv = both["loss"].to_numpy(dtype="float64")
    gv = both["grad"].to_numpy(dtype="float64")
    steps = both.index.to_numpy()
    g_bad = ~np.isfinite(gv)
    # pattern A: the step's grad_norm is NaN/Inf but the logged loss is finite and exactly 0.0, or a
    # verbatim repeat of the previous logged value (what a NaN-replacing fallback produces)
    prev = np.concatenate([[np.nan], lv[:-1]])
    zero = g_bad & (lv == 0.0)
    frozen = g_bad & np.isfinite(lv) & (lv != 0.0) & (lv == prev)
    out.nan_steps = [int(s) for s in steps[g_bad]]
    out.zero_steps = [int(s) for s in steps[zero]]
    out.frozen_steps = [int(s) for s in steps[frozen]]
    # pattern B: loss equal to a suspicious constant while grad_norm is exactly 0 (a constant tensor
    # with no graph behind it). Preference/RL objectives can legitimately be 0 with no gradient.
    if loss_not_cross_entropy(run) is None:
        best: tuple[int, float | None, np.ndarray | None] = (0, None, None)
        for c in t.suspicious_constants:
            m = (lv == float(c)) & (gv == 0.0)  # non-finite grad_norm steps are pattern A
            if int(m.sum()) > best[0]:
                best = (int(m.sum()), float(c), m)
        if best[0] > 0 and best[2] is not None:
            m = best[2]
            out.const_value = best[1]
            out.const_steps = [int(s) for s in steps[m]]
            n, i0, i1 = _longest_run(m)
            out.const_longest = (n, int(steps[i0]), int(steps[i1]))
    return out


@check("HD302", "nan-masked", rank=10)
def nan_masked(run: Run, t: Thresholds) -> list[Finding]:
    """The logged loss is not the loss: NaN/Inf steps were hidden as 0.0, a frozen value or a constant.

    What it detects: (a) Steps where `grad_norm` is NaN/Inf while the logged `loss` at the same step is exactly
    0.0 or repeats the previous value verbatim. (b) A loss pinned to one of the suspicious
    constants (default 0.0 and 0.001) with `grad_norm` exactly 0 over consecutive logged steps.

    Why it happens: HF Trainer's `logging_nan_inf_filter=True` (the default) replaces a NaN/Inf step loss by the
    average of the window logged so far; when every step of the window was NaN (or NaN started at
    the first step) the logged `loss` is 0.0 while `grad_norm` is NaN. Community trainers also
    wrap `compute_loss` in try/except and return `torch.tensor(0.001)` or 0.0 when the loss is
    NaN or raises: a constant has no graph, so `grad_norm` is 0.0 and nothing is learned. For
    Higgs Audio a typical source is a batch whose `label_audio_ids` are all -100: the mean
    cross-entropy over zero targets is NaN.

    Example: grad_norm is NaN at 40 of 40 logged steps (first step 10, last step 400); at 40 of them loss
    is logged as exactly 0.0.

    Fix: Set `logging_nan_inf_filter=False` to see the real values, remove any try/except that
    substitutes a constant loss, and fix the NaN at its source: lower `learning_rate`, use
    `bf16=True` instead of `fp16`, keep `max_grad_norm=1.0`, and skip or guard batches with no
    valid label (`loss = ce_sum / valid.sum().clamp(min=1)`).
    """
    out: list[Finding] = []
    m = _find_masked(run, t)
    filt = run.arg("logging_nan_inf_filter")
    filt_line = (f"TrainingArguments.logging_nan_inf_filter = {filt}" if filt is not None else
                 "logging_nan_inf_filter is not in the logs; HF's default is True")
    grad = run.series("grad_norm")
    n_grad = int(len(grad))

    masked = m.masked_steps
    if masked:
        share = len(masked) / max(1, m.n_loss)
        last_loss_step = int(run.series("loss").index[-1])
        persists = masked[-1] == last_loss_step
        sev = Severity.CRITICAL if (share >= t.nonfinite_critical_share or persists) else Severity.WARNING
        n_nan = int(np.isnan(grad.to_numpy()).sum())
        kind = "NaN" if n_nan else "Inf"
        ev = [f"grad_norm is {kind} at {len(m.nan_steps)} of {n_grad} logged steps "
              f"(first step {m.nan_steps[0]}, last step {m.nan_steps[-1]})"]
        if m.zero_steps:
            ev.append(f"at {len(m.zero_steps)} of them the logged loss is exactly 0.0 "
                      f"(steps {_steps_text(m.zero_steps)})")
        if m.frozen_steps:
            ev.append(f"at {len(m.frozen_steps)} of them the logged loss repeats the previous value "
                      f"verbatim (steps {_steps_text(m.frozen_steps)})")
        loss = run.series("loss")
        ok = loss[~loss.index.isin(masked) & np.isfinite(loss.to_numpy())]
        if not ok.empty:
            ev.append(f"elsewhere the loss reads {fmt(ok.min())}..{fmt(ok.max())} over {len(ok)} logged steps")
        if persists:
            ev.append(f"the masking lasts to the last logged step ({last_loss_step}): the run never recovered")
        ev.append(filt_line)
        out.append(finding(
            sev,
            f"Loss hides NaN/Inf: logged as 0.0 or frozen on {len(masked)} steps where grad_norm is {kind}",
            evidence=ev,
            explanation=(
                "The logged loss is not the loss on these steps. With logging_nan_inf_filter=True the "
                "Trainer replaces a NaN/Inf step loss by the average of the steps logged so far in the "
                "window; a window of only NaN steps (or NaN from the first step) is logged as 0.0, and "
                "a fallback in user code can freeze it at the previous value. The non-finite grad_norm "
                "logged at the same steps is the real signal: the forward or backward pass produced "
                "NaN/Inf, and unless the fp16 grad scaler skipped these updates the weights are now NaN."),
            fix=(
                "Run again with logging_nan_inf_filter=False to see every NaN step; fix the source: lower "
                "learning_rate, use bf16=True instead of fp16=True, keep max_grad_norm=1.0, and guard "
                "batches with no valid label (every label -100 makes a mean cross-entropy NaN): divide the "
                "summed loss by valid.sum().clamp(min=1). Do not resume from a checkpoint saved after "
                f"step {m.nan_steps[0]} without checking its weights for NaN."),
            steps=(masked[0], masked[-1]),
            metrics=("loss", "grad_norm"),
        ))

    if m.const_steps:
        n_run, s0, s1 = m.const_longest
        share = len(m.const_steps) / max(1, m.n_loss)
        c = fmt(m.const_value)
        if n_run >= t.masked_min_steps:
            sev = Severity.CRITICAL if share >= t.nonfinite_critical_share else Severity.WARNING
            title = (f"Loss pinned to {c} with grad_norm 0.0 on {n_run} consecutive logged steps: "
                     f"a constant replaced the real loss")
            steps = (s0, s1)
        else:
            sev = Severity.INFO
            title = (f"Loss exactly {c} with grad_norm 0.0 on {len(m.const_steps)} isolated logged "
                     f"step(s): batches with nothing to learn or a fallback constant")
            steps = (m.const_steps[0], m.const_steps[-1])
        ev = [f"loss == {c} and grad_norm == 0.0 at {len(m.const_steps)} of {m.n_loss} logged steps "
              f"(steps {_steps_text(m.const_steps)})",
              f"longest consecutive stretch: {n_run} logged steps ({s0}..{s1})"]
        out.append(finding(
            sev, title, evidence=ev,
            explanation=(
                "A loss that sits exactly on a round constant while the gradient norm is exactly zero is "
                "not computed from the model: a constant tensor has no graph, so backward() produces no "
                "gradient and the optimizer does nothing. This is what a try/except around compute_loss "
                "that returns torch.tensor(0.001) (or 0.0) on NaN or on an exception produces; isolated "
                "steps can also be batches in which every label is -100 and the loss code returns 0."),
            fix=(
                "Remove the fallback that returns a constant loss; let the exception or NaN surface "
                "(logging_nan_inf_filter=False) and fix its cause. If some batches legitimately have no "
                "target (all labels -100), filter those samples in the dataset/collator instead of "
                "returning a constant."),
            steps=steps,
            metrics=("loss", "grad_norm"),
        ))
    return out


@check("HD301", "non-finite", rank=12)
def non_finite(run: Run, t: Thresholds) -> list[Finding]:
    """NaN or Inf values in a logged loss or gradient norm.

    What it detects: NaN/Inf in `loss`, `eval_loss`, any other `*loss*` series (`audio_loss`,
    `text_loss`, `audio_loss_cb{k}`, `train_loss`) and `grad_norm`: how many, first and last
    step. A non-finite loss is critical. For `grad_norm` alone: a few isolated Inf steps with a
    finite loss around them are fp16 overflow steps that the grad scaler skipped (info); a few
    isolated NaN steps are a warning; non-finite on at least `nonfinite_critical_share` of the
    logged steps is critical (NaN) or a warning (Inf: the scaler keeps skipping updates).

    Why it happens: Too high a learning rate, fp16 overflow in attention/logits, a batch whose labels are all -100
    (a mean cross-entropy over zero targets is 0/0 = NaN; for Higgs Audio a sample whose
    `label_audio_ids` are all masked), log of zero in a custom loss, or bad input features.
    With bf16/fp32 there is no scaler: one NaN gradient makes every weight NaN.

    Example: loss is NaN at 120 of 300 logged steps (first step 1210, last step 1500); last finite loss
    2.314 at step 1200.

    Fix: Lower `learning_rate` (Higgs fine-tuning: 1e-5..1e-4), keep `max_grad_norm=1.0`, prefer
    `bf16=True` over `fp16=True`, set `logging_nan_inf_filter=False` to see each bad step,
    and guard the loss against batches with no valid label.
    """
    out: list[Finding] = []
    masked = set(_find_masked(run, t).masked_steps)

    loss_lines: list[str] = []
    loss_steps: list[int] = []
    loss_metrics: list[str] = []
    for metric in _loss_metrics(run):
        s = run.series(metric)
        bad = ~np.isfinite(s.to_numpy(dtype="float64"))
        if not bad.any():
            continue
        bs = s[bad]
        n_nan = int(np.isnan(bs.to_numpy()).sum())
        kinds = ", ".join(k for k, n in (("NaN", n_nan), ("Inf", len(bs) - n_nan)) if n)
        line = (f"{metric} is non-finite ({kinds}) at {len(bs)} of {len(s)} logged steps "
                f"(first step {int(bs.index[0])}, last step {int(bs.index[-1])})")
        fin = s[~bad]
        before = fin[fin.index < bs.index[0]]
        if not before.empty:
            line += f"; last finite value {fmt(before.iloc[-1])} at step {int(before.index[-1])}"
        if not fin[fin.index > bs.index[-1]].empty:
            line += "; finite again afterwards"
        loss_lines.append(line)
        loss_steps += [int(bs.index[0]), int(bs.index[-1])]
        loss_metrics.append(metric)

    grad = run.series("grad_norm")
    gbad = grad[~np.isfinite(grad.to_numpy(dtype="float64"))]
    gbad = gbad[~gbad.index.isin(list(masked))]
    g_nan = int(np.isnan(gbad.to_numpy()).sum())
    g_inf = int(len(gbad) - g_nan)
    g_line = None
    if len(gbad):
        g_line = (f"grad_norm is non-finite at {len(gbad)} of {len(grad)} logged steps "
                  f"({g_nan} NaN, {g_inf} Inf; first step {int(gbad.index[0])}, last step {int(gbad.index[-1])}"
                  f"; steps {_steps_text(gbad.index)})")

    if loss_lines:
        ev = loss_lines + ([g_line] if g_line else [])
        first, last = min(loss_steps), max(loss_steps)
        if g_line:
            first, last = min(first, int(gbad.index[0])), max(last, int(gbad.index[-1]))
        out.append(finding(
            Severity.CRITICAL,
            f"Non-finite loss: {', '.join(loss_metrics)} became NaN/Inf (first at step {min(loss_steps)})",
            evidence=ev,
            explanation=(
                "A NaN/Inf loss means the forward pass overflowed or divided by zero; its gradient is "
                "NaN too, and without an fp16 grad scaler to skip the step the optimizer writes NaN into "
                "every weight, so every later step and checkpoint is broken. Typical causes: a learning "
                "rate too high, fp16 overflow, or a batch in which every label is -100 (for Higgs Audio, "
                "a sample whose label_audio_ids are all masked), which makes a mean cross-entropy 0/0."),
            fix=(
                "Lower learning_rate, keep max_grad_norm=1.0, train with bf16=True rather than fp16=True, "
                "set logging_nan_inf_filter=False to see each bad step, and compute the loss as "
                "ce_sum / valid.sum().clamp(min=1). Resume only from a checkpoint saved before step "
                f"{min(loss_steps)}."),
            steps=(first, last),
            metrics=tuple(loss_metrics) + (("grad_norm",) if g_line else ()),
        ))
        return out

    if g_line:
        share = len(gbad) / max(1, len(grad))
        loss = run.series("loss")
        loss_ok = loss.empty or bool(np.isfinite(loss.to_numpy()).all())
        if g_nan == 0:
            sev = Severity.WARNING if share >= t.nonfinite_critical_share else Severity.INFO
        else:
            sev = Severity.CRITICAL if share >= t.nonfinite_critical_share else Severity.WARNING
        ev = [g_line]
        if not loss.empty:
            ev.append("loss stays finite at every logged step" if loss_ok else "loss is non-finite too")
        if run.arg("fp16") is not None:
            ev.append(f"TrainingArguments.fp16 = {run.arg('fp16')}, bf16 = {run.arg('bf16')}")
        if g_nan == 0:
            title = f"grad_norm is Inf at {g_inf} logged step(s): fp16 overflow steps skipped by the grad scaler"
            expl = ("An Inf gradient norm with a finite loss around it is what fp16 mixed precision logs when "
                    "the loss scale is too large: the GradScaler detects the overflow, skips that optimizer "
                    "step and halves the scale. A few such steps (often at the start) are normal; many mean "
                    "the scaler keeps skipping updates.")
            fix = ("Nothing to do for a few early steps. If they recur, train with bf16=True instead of "
                   "fp16=True or lower learning_rate.")
        else:
            title = f"grad_norm is NaN at {g_nan} logged step(s) while the loss stays finite"
            expl = ("A NaN gradient norm with a finite loss means the backward pass produced NaN/Inf. Under "
                    "fp16 the grad scaler skips such a step (the update is lost, training continues); under "
                    "bf16/fp32 a NaN gradient would reach the weights, so check that the loss stays finite "
                    "after these steps. On many steps, training is effectively stalled.")
            fix = ("Use bf16=True instead of fp16=True if the hardware supports it, lower learning_rate, keep "
                   "max_grad_norm=1.0, and look for batches with extreme inputs or no valid label at these "
                   "steps.")
        out.append(finding(sev, title, evidence=ev, explanation=expl, fix=fix,
                           steps=(int(gbad.index[0]), int(gbad.index[-1])), metrics=("grad_norm",)))
    return out


# The links from no-learning, plateau and divergence to HD302/HD301 are declared next to those
# symptoms, in optimisation.py.

# The NaN explains the frozen or zero loss (not the other way round): when the non-finite values are
# visible in some series (audio_loss, eval_loss, text_loss: the Trainer filters only `loss`), HD301 is
# the root cause and HD302 the symptom that hid it. When only grad_norm shows the NaN, HD301 leaves
# those points to HD302, which then stands alone.
causes("HD302", "HD301")
