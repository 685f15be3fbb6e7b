"""Numerics: NaN/Inf in the logged losses and gradient norms, and NaN hidden behind a loss that is not the loss.

HD302-HD304 (nan-masked) explain the flat or zero loss curves that the optimisation rules would otherwise
report as their own problems (no-learning, plateau): the loss looks flat because what was logged is not
the loss. HD301 (a non-finite loss, where it is visible) explains them in turn. HD305/HD306 report a
non-finite gradient norm under a loss that stays finite everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..config import Thresholds
from ..diagnosis import Finding, Severity
from ..run.model import Run
from . import causes, check, finding
from ._util import fmt, longest_true_run, loss_not_cross_entropy, steps_list


def _loss_metrics(run: Run) -> list[str]:
    """Every logged series that is a loss (train, eval, per-component, the end-of-train summary)."""
    return [m for m in run.metrics if "loss" in m.lower()]


@dataclass
class _Masked:
    """Steps whose grad_norm is NaN/Inf while the logged loss at the same step is finite: 0.0 (HD302) or a
    verbatim repeat of the previous logged value (HD303). HD301/HD305/HD306 leave these steps to them."""

    nan_steps: list[int] = field(default_factory=list)  # every non-finite grad_norm step with a loss
    zero_steps: list[int] = field(default_factory=list)
    frozen_steps: list[int] = field(default_factory=list)
    grad_at: dict[int, float] = field(default_factory=dict)  # grad_norm at the masked steps
    n_loss: int = 0

    @property
    def masked_steps(self) -> list[int]:
        return sorted(set(self.zero_steps) | set(self.frozen_steps))


def _find_masked(run: Run) -> _Masked:
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
    prev = np.concatenate([[np.nan], lv[:-1]])
    zero = g_bad & (lv == 0.0)
    frozen = g_bad & np.isfinite(lv) & (lv != 0.0) & (lv == prev)
    out.nan_steps = [int(s) for s in steps[g_bad]]
    out.zero_steps = [int(s) for s in steps[zero]]
    out.frozen_steps = [int(s) for s in steps[frozen]]
    out.grad_at = {int(s): float(g) for s, g in zip(steps[zero | frozen], gv[zero | frozen])}
    return out


def _kind(values) -> str:
    return "NaN" if any(np.isnan(v) for v in values) else "Inf"


def _filter_line(run: Run) -> str:
    filt = run.arg("logging_nan_inf_filter")
    return (f"TrainingArguments.logging_nan_inf_filter = {filt}" if filt is not None else
            "logging_nan_inf_filter is not in the logs; HF's default is True")


def _masked_finding(run: Run, t: Thresholds, m: _Masked, steps: list[int], how: str, title: str) -> Finding:
    """The finding of HD302 or HD303: ``steps`` are the masked steps of that rule, ``how`` says what the
    loss reads there."""
    loss = run.series("loss")
    last_loss_step = int(loss.index[-1])
    persists = steps[-1] == last_loss_step
    share = len(steps) / max(1, m.n_loss)
    sev = Severity.CRITICAL if (share >= t.nonfinite_critical_share or persists) else Severity.WARNING
    kind = _kind(m.grad_at[s] for s in steps)
    ev = [f"grad_norm is non-finite at {len(m.nan_steps)} of {len(run.series('grad_norm'))} logged steps "
          f"(first step {m.nan_steps[0]}, last step {m.nan_steps[-1]})",
          f"at {len(steps)} of them the logged loss {how} (steps {steps_list(steps)})"]
    ok = loss[~loss.index.isin(m.masked_steps) & np.isfinite(loss.to_numpy())]
    if not ok.empty:
        ev.append(f"elsewhere the loss reads {fmt(ok.min())}..{fmt(ok.max())} over {len(ok)} logged steps")
    if persists:
        ev.append(f"the masking lasts to the last logged step ({last_loss_step}): the run never recovered")
    ev.append(_filter_line(run))
    return finding(
        sev, title.format(n=len(steps), kind=kind), evidence=ev,
        fix_detail=f"The first non-finite grad_norm here is at step {m.nan_steps[0]}.",
        steps=(steps[0], steps[-1]), metrics=("loss", "grad_norm"))


# ---- HD302-HD304: a loss that is not the loss ------------------------------------------------------

@check("HD302", "nan-masked", rank=10, thresholds=("nonfinite_critical_share",))
def nan_logged_as_zero(run: Run, t: Thresholds) -> list[Finding]:
    """The logged loss is 0.0 where grad_norm is NaN/Inf: the Trainer's NaN filter hid a non-finite loss.

    What it detects: Steps where `grad_norm` is NaN/Inf while the logged `loss` at the same step is exactly
    0.0. Critical when they are at least `nonfinite_critical_share` of the logged loss steps or last
    to the last logged step; a warning for a window that was masked and recovered.

    Why it happens: HF Trainer's `logging_nan_inf_filter=True` (the default) replaces a NaN/Inf step loss by
    the average of the steps logged so far in the logging window; when every step of the window was
    NaN (or NaN started at the first step) the logged `loss` is 0.0. The logged loss is then not the
    loss: the non-finite `grad_norm` logged at the same steps is the real signal. The forward or
    backward pass produced NaN/Inf, and unless the fp16 grad scaler skipped these updates the weights
    are now NaN. For Higgs Audio a typical source is a batch whose `label_audio_ids` are all -100: the
    mean cross-entropy over zero targets is 0/0 = NaN.

    Example: grad_norm is non-finite at 40 of 40 logged steps (first step 10, last step 400); at 40 of them
    the logged loss is exactly 0.0.

    Fix: Run again with `logging_nan_inf_filter=False` to see every NaN step, and fix the NaN at its
    source: lower `learning_rate`, use `bf16=True` instead of `fp16=True`, keep `max_grad_norm=1.0`,
    and guard batches with no valid label (`loss = ce_sum / valid.sum().clamp(min=1)`). Do not resume
    from a checkpoint saved after the first NaN step without checking its weights for NaN.
    """
    m = _find_masked(run)
    if not m.zero_steps:
        return []
    return [_masked_finding(run, t, m, m.zero_steps, "is exactly 0.0",
                            "Loss logged as 0.0 on {n} step(s) where grad_norm is {kind}: the NaN filter hid "
                            "a non-finite loss")]


@check("HD303", "nan-masked", rank=10, thresholds=("nonfinite_critical_share",))
def nan_frozen_loss(run: Run, t: Thresholds) -> list[Finding]:
    """The logged loss repeats its previous value where grad_norm is NaN/Inf: a fallback froze the loss.

    What it detects: Steps where `grad_norm` is NaN/Inf while the logged `loss` at the same step is finite,
    nonzero and a verbatim repeat of the previous logged value. Critical when they are at least
    `nonfinite_critical_share` of the logged loss steps or last to the last logged step; else a warning.

    Why it happens: The Trainer's own NaN filter logs a window average or 0.0 (HD302), never the previous
    logged value verbatim: a frozen loss comes from user code that replaces a NaN/Inf loss by the last
    good one (`if torch.isnan(loss): loss = self.last_loss` in `compute_loss`, or a callback or logger
    that re-reports a cached number). The curve then looks flat while the forward or backward pass
    produces NaN/Inf on these steps; unless the fp16 grad scaler skipped the updates, the weights are
    now NaN.

    Example: grad_norm is non-finite at 20 of 50 logged steps (first step 31, last step 50); at 20 of them
    the logged loss repeats the previous value verbatim.

    Fix: Remove the code that substitutes the previous loss and let the NaN surface (with
    `logging_nan_inf_filter=False`); then fix it at its source: lower `learning_rate`, use `bf16=True`
    instead of `fp16=True`, keep `max_grad_norm=1.0`, and guard batches with no valid label
    (`loss = ce_sum / valid.sum().clamp(min=1)`). Do not resume from a checkpoint saved after the first
    NaN step without checking its weights for NaN.
    """
    m = _find_masked(run)
    if not m.frozen_steps:
        return []
    return [_masked_finding(run, t, m, m.frozen_steps, "repeats the previous value verbatim",
                            "Loss frozen at its previous value on {n} step(s) where grad_norm is {kind}: "
                            "a fallback hid a non-finite loss")]


def _pinned_constant(run: Run, t: Thresholds) -> tuple[float, list[int], tuple[int, int, int]] | None:
    """(constant, steps, (longest stretch, its first step, its last step)) of the suspicious constant the
    loss equals most often while grad_norm is exactly 0; None when there is none."""
    if loss_not_cross_entropy(run) is not None:  # a preference/RL objective can be 0 with no gradient
        return None
    loss, grad = run.series("loss"), run.series("grad_norm")
    if loss.empty or grad.empty:
        return None
    both = pd.concat([loss.rename("loss"), grad.rename("grad")], axis=1, join="inner")
    lv = both["loss"].to_numpy(dtype="float64")
    gv = both["grad"].to_numpy(dtype="float64")
    steps = both.index.to_numpy()
    best: tuple[int, float | None, np.ndarray | None] = (0, None, None)
    for c in t.suspicious_constants:
        mask = (lv == float(c)) & (gv == 0.0)  # non-finite grad_norm steps are HD302/HD303's
        if int(mask.sum()) > best[0]:
            best = (int(mask.sum()), float(c), mask)
    if best[0] == 0 or best[2] is None:
        return None
    n, i0, i1 = longest_true_run(best[2])
    return best[1], [int(s) for s in steps[best[2]]], (n, int(steps[i0]), int(steps[i1]))


@check("HD304", "nan-masked", rank=10,
       thresholds=("suspicious_constants", "masked_min_steps", "nonfinite_critical_share"))
def constant_loss(run: Run, t: Thresholds) -> list[Finding]:
    """The loss is pinned to a round constant while grad_norm is exactly 0: a constant replaced the real loss.

    What it detects: A train `loss` equal to one of `suspicious_constants` (default 0.0 and 0.001) while
    `grad_norm` is exactly 0.0. A warning when the longest consecutive stretch reaches
    `masked_min_steps` logged steps (critical when such steps are at least `nonfinite_critical_share`
    of the logged ones); info for isolated steps. Runs whose loss is not a cross-entropy (TRL
    preference/RL objectives) are skipped: their objective can be 0 with no gradient.

    Why it happens: A loss that sits exactly on a round constant while the gradient norm is exactly zero is
    not computed from the model: a constant tensor has no graph, so `backward()` produces no gradient
    and the optimizer does nothing. Community trainers wrap `compute_loss` in try/except and return
    `torch.tensor(0.001)` or 0.0 when the loss is NaN or raises. Isolated steps can also be batches in
    which every label is -100 and the loss code returns 0.

    Example: loss == 0.001 and grad_norm == 0.0 at 30 of 100 logged steps; longest consecutive stretch:
    30 logged steps (41..70).

    Fix: Remove the fallback that returns a constant loss; let the exception or NaN surface
    (`logging_nan_inf_filter=False`) and fix its cause. If some batches legitimately have no target
    (all labels -100), filter those samples in the dataset or collator instead of returning a constant.
    """
    pinned = _pinned_constant(run, t)
    if pinned is None:
        return []
    value, steps, (n_run, s0, s1) = pinned
    n_loss = len(run.series("loss"))
    c = fmt(value)
    if n_run >= t.masked_min_steps:
        share = len(steps) / max(1, n_loss)
        sev = Severity.CRITICAL if share >= t.nonfinite_critical_share else Severity.WARNING
        span = (s0, s1)
    else:
        sev, span = Severity.INFO, (steps[0], steps[-1])
    ev = [f"loss == {c} and grad_norm == 0.0 at {len(steps)} of {n_loss} logged steps (steps {steps_list(steps)})",
          f"longest consecutive stretch: {n_run} logged steps ({s0}..{s1})"
          + ("" if n_run >= t.masked_min_steps else
             f"; isolated steps (under masked_min_steps={t.masked_min_steps}) can be batches with nothing to learn")]
    return [finding(
        sev, f"Loss pinned to {c} with grad_norm 0.0 on {len(steps)} logged step(s) (longest stretch {n_run})",
        evidence=ev, steps=span, metrics=("loss", "grad_norm"))]


# ---- HD301: a non-finite loss ------------------------------------------------------------------------

def _nonfinite_line(metric: str, s: pd.Series) -> tuple[str, int, int] | None:
    bad = ~np.isfinite(s.to_numpy(dtype="float64"))
    if not bad.any():
        return None
    bs = s[bad]
    n_nan = int(np.isnan(bs.to_numpy()).sum())
    kinds = ", ".join(k for k, n in (("NaN", n_nan), ("Inf", len(bs) - n_nan)) if n)
    first, last = int(bs.index[0]), int(bs.index[-1])
    line = (f"{metric} is non-finite ({kinds}) at {len(bs)} of {len(s)} logged steps "
            f"(first step {first}, last step {last})")
    fin = s[~bad]
    before = fin[fin.index < first]
    if not before.empty:
        line += f"; last finite value {fmt(before.iloc[-1])} at step {int(before.index[-1])}"
    if (fin.index > last).any():
        line += "; finite again afterwards"
    return line, first, last


def _nonfinite_losses(run: Run) -> list[tuple[str, str, int, int]]:
    """(metric, evidence line, first step, last step) for every loss series with a NaN/Inf value."""
    out = []
    for metric in _loss_metrics(run):
        r = _nonfinite_line(metric, run.series(metric))
        if r is not None:
            out.append((metric,) + r)
    return out


def _unmasked_bad_grad(run: Run) -> pd.Series:
    """The non-finite grad_norm points that HD302/HD303 do not already explain."""
    grad = run.series("grad_norm")
    gbad = grad[~np.isfinite(grad.to_numpy(dtype="float64"))]
    if gbad.empty:
        return gbad
    return gbad[~gbad.index.isin(_find_masked(run).masked_steps)]


@check("HD301", "non-finite", rank=12)
def non_finite_loss(run: Run, t: Thresholds) -> list[Finding]:
    """A logged loss became NaN or Inf.

    What it detects: NaN/Inf in `loss`, `eval_loss` or any other `*loss*` series (`audio_loss`,
    `text_loss`, `audio_loss_cb{k}`, `train_loss`): how many, first and last step, the last finite value
    before; non-finite `grad_norm` steps are listed with it. Always critical.

    Why it happens: The forward pass overflowed or divided by zero; the gradient is NaN too, and without an
    fp16 grad scaler to skip the step (bf16 and fp32 have none) the optimizer writes NaN into every
    weight, so every later step and checkpoint is broken. Typical causes: a learning rate too high,
    fp16 overflow in attention or logits, a batch whose labels are all -100 (a mean cross-entropy over
    zero targets is 0/0 = NaN; for Higgs Audio a sample whose `label_audio_ids` are all masked), log
    of zero in a custom loss, or bad input features.

    Example: loss is NaN at 120 of 300 logged steps (first step 1210, last step 1500); last finite loss
    2.314 at step 1200.

    Fix: Lower `learning_rate` (Higgs fine-tuning: 1e-5..1e-4), keep `max_grad_norm=1.0`, prefer
    `bf16=True` over `fp16=True`, set `logging_nan_inf_filter=False` to see each bad step, and
    compute the loss as `ce_sum / valid.sum().clamp(min=1)` so a batch with no valid label cannot
    make it NaN. Resume only from a checkpoint saved before the first non-finite step.
    """
    losses = _nonfinite_losses(run)
    if not losses:
        return []
    names = tuple(metric for metric, _line, _first, _last in losses)
    ev = [line for _metric, line, _first, _last in losses]
    first_loss = min(first for *_, first, _last in losses)
    first, last = first_loss, max(last for *_, last in losses)
    gbad = _unmasked_bad_grad(run)  # listed with the loss: the same event
    if not gbad.empty:
        g_nan = int(np.isnan(gbad.to_numpy()).sum())
        ev.append(f"grad_norm is non-finite at {len(gbad)} of {len(run.series('grad_norm'))} logged steps "
                  f"({g_nan} NaN, {len(gbad) - g_nan} Inf; steps {steps_list(gbad.index)})")
        first, last = min(first, int(gbad.index[0])), max(last, int(gbad.index[-1]))
    return [finding(
        Severity.CRITICAL, f"Non-finite loss: {', '.join(names)} became NaN/Inf (first at step {first_loss})",
        evidence=ev, fix_detail=f"The first non-finite loss here is at step {first_loss}.",
        steps=(first, last), metrics=names + (("grad_norm",) if not gbad.empty else ()))]


# ---- HD305/HD306: a non-finite gradient norm under a finite loss ------------------------------------

def _bad_grad_evidence(run: Run, pts: pd.Series, kind: str) -> list[str]:
    grad = run.series("grad_norm")
    ev = [f"grad_norm is {kind} at {len(pts)} of {len(grad)} logged steps (first step {int(pts.index[0])}, "
          f"last step {int(pts.index[-1])}; steps {steps_list(pts.index)})"]
    if not run.series("loss").empty:
        ev.append("loss stays finite at every logged step")
    if run.arg("fp16") is not None:
        ev.append(f"TrainingArguments.fp16 = {run.arg('fp16')}, bf16 = {run.arg('bf16')}")
    return ev


def _grad_points(run: Run, nan: bool) -> pd.Series | None:
    """The unexplained NaN (``nan``) or Inf grad_norm points when every logged loss is finite, else None."""
    gbad = _unmasked_bad_grad(run)
    if gbad.empty or _nonfinite_losses(run):
        return None  # a non-finite loss is HD301's, with these points in its evidence
    pts = gbad[np.isnan(gbad.to_numpy()) == nan]
    return pts if not pts.empty else None


@check("HD305", "non-finite", rank=12, thresholds=("nonfinite_critical_share",))
def nan_grad_norm(run: Run, t: Thresholds) -> list[Finding]:
    """grad_norm is NaN at logged steps while every logged loss stays finite.

    What it detects: NaN `grad_norm` values at steps where the logged loss does not hide them (those are
    HD302/HD303's) while no loss series is non-finite (that is HD301). A warning; critical when at
    least `nonfinite_critical_share` of the logged `grad_norm` points are NaN.

    Why it happens: The backward pass produced NaN/Inf while the forward loss was finite: fp16 overflow in
    the gradients, a learning rate too high, a batch with extreme inputs, or a custom loss whose
    gradient is undefined (a square root or log at 0, a division by a count of zero valid labels).
    Under fp16 the grad scaler skips such a step (the update is lost, training continues); under bf16
    or fp32 a NaN gradient would reach the weights, so check that the loss stays finite after these
    steps. On many steps training is effectively stalled.

    Example: grad_norm is NaN at 2 of 100 logged steps (first step 21, last step 71); the loss stays finite
    at every logged step.

    Fix: Use `bf16=True` instead of `fp16=True` if the hardware supports it, lower `learning_rate`, keep
    `max_grad_norm=1.0`, and look for batches with extreme inputs or no valid label at these steps.
    """
    pts = _grad_points(run, nan=True)
    if pts is None:
        return []
    share = len(pts) / max(1, len(run.series("grad_norm")))
    sev = Severity.CRITICAL if share >= t.nonfinite_critical_share else Severity.WARNING
    return [finding(sev, f"grad_norm is NaN at {len(pts)} logged step(s) while the loss stays finite",
                    evidence=_bad_grad_evidence(run, pts, "NaN"),
                    steps=(int(pts.index[0]), int(pts.index[-1])), metrics=("grad_norm",))]


@check("HD306", "non-finite", rank=12, thresholds=("nonfinite_critical_share",))
def inf_grad_norm(run: Run, t: Thresholds) -> list[Finding]:
    """grad_norm is Inf with a finite loss: fp16 overflow steps that the grad scaler skipped.

    What it detects: Inf (not NaN) `grad_norm` values while every logged loss stays finite. Info; a warning
    when at least `nonfinite_critical_share` of the logged `grad_norm` points are Inf (the scaler keeps
    skipping updates).

    Why it happens: Under fp16 mixed precision the loss is multiplied by a scale before backward; when the
    scale is too large the gradients overflow. The GradScaler detects the overflow, skips that
    optimizer step and halves the scale, and the Trainer logs the Inf norm. A few such steps (often at
    the start, while the scale settles) are normal; many mean a large share of the updates is lost.

    Example: grad_norm is Inf at 1 of 100 logged steps (step 4); the loss stays finite at every logged step.

    Fix: Nothing to do for a few early steps. If they recur, train with `bf16=True` instead of
    `fp16=True`, or lower `learning_rate`.
    """
    pts = _grad_points(run, nan=False)
    if pts is None:
        return []
    share = len(pts) / max(1, len(run.series("grad_norm")))
    sev = Severity.WARNING if share >= t.nonfinite_critical_share else Severity.INFO
    return [finding(sev, f"grad_norm is Inf at {len(pts)} logged step(s): fp16 overflow steps skipped by the "
                         "grad scaler",
                    evidence=_bad_grad_evidence(run, pts, "Inf"),
                    steps=(int(pts.index[0]), int(pts.index[-1])), metrics=("grad_norm",))]


# The links from no-learning, plateau and divergence to the masked-loss rules and HD301 are declared next
# to those symptoms, in optimisation.py.

# The NaN explains the zero, frozen or constant loss (not the other way round): when the non-finite values
# are visible in some series (audio_loss, eval_loss, text_loss: the Trainer filters only `loss`), HD301 is
# the root cause and the rule that found the mask is the symptom that hid it. When only grad_norm shows
# the NaN, HD301 leaves those points to HD302/HD303, which then stand alone.
causes("HD302", "HD301")
causes("HD303", "HD301")
causes("HD304", "HD301")


# ---- HD307: float16 weights without mixed precision ---------------------------------------------------------
_HALF = ("float16", "torch.float16", "fp16", "half")


def _weights_dtype(run: Run) -> tuple[str | None, str]:
    """The dtype the weights were trained in: what the checkpoints store (their safetensors headers, else their
    config.json), else the logged model_config's `torch_dtype` (HF leaves it at the dtype the config was made
    with when the model is cast later, e.g. `model.half()`)."""
    for c in run.checkpoints:
        if c.dtype:
            return str(c.dtype), f"{c.dtype_from}: weights stored as {c.dtype}"
    dt = run.config("torch_dtype")
    if isinstance(dt, str) and dt:
        return dt, f"model_config torch_dtype={dt!r} ({run.model_config_file})"
    return None, ""


@check("HD307", "precision-mismatch", rank=9)
def half_weights_without_amp(run: Run, t: Thresholds) -> list[Finding]:
    """float16 weights trained without mixed precision: every update is computed in float16, which overflows.

    What it detects: the model's weights are float16 (the checkpoints store float16, read from their
    safetensors headers or `config.json`, or the logged `model_config` says `"torch_dtype": "float16"`) while the TrainingArguments have `fp16=False` and
    `bf16=False`, and the run went non-finite: a NaN/Inf loss or `grad_norm`, or a loss logged as 0.0 while
    `grad_norm` is NaN (HF's NaN filter).

    Why it happens: `from_pretrained(..., torch_dtype=torch.float16)` (or `model.half()`) puts the weights,
    activations, gradients and optimizer state in float16. Without `fp16=True` there is no loss scaling and no
    float32 master copy: the gradients of a cross-entropy over 1026 audio classes and a 128k vocabulary
    overflow (float16's largest value is 65504) or underflow, AdamW's second moments leave the float16 range,
    and the first NaN arrives within a few steps. Every later step is NaN, or 0.0 in the logs when HF's
    `logging_nan_inf_filter` hides it.

    Example: `model_config torch_dtype='float16'; fp16=False, bf16=False; grad_norm NaN from step 2; loss
    logged as 0.0 at 48 of 50 steps`.

    Fix: load the weights in float32 (`torch_dtype=torch.float32`) and train with `bf16=True` on hardware
    that supports it (Ampere or newer), or `fp16=True` (mixed precision with loss scaling and float32 master
    weights); never train float16 weights directly.
    """
    dt, where = _weights_dtype(run)
    if dt is None or dt.lower() not in _HALF or not run.args:
        return []
    if run.args.get("fp16") or run.args.get("bf16") or run.args.get("half_precision_backend") == "apex":
        return []
    bad = []
    for m in ("loss", "grad_norm", "eval_loss"):
        s = run.series(m)
        v = s.to_numpy(dtype="float64")
        nf = ~np.isfinite(v)
        if nf.any():
            bad.append((m, int(s.index[int(np.argmax(nf))]), int(nf.sum()), len(v)))
    if not bad:
        return []
    first = min(b[1] for b in bad)
    return [finding(Severity.CRITICAL, f"float16 weights trained without mixed precision went non-finite from step "
                                       f"{first}", evidence=[where, f"fp16={run.args.get('fp16')!r}, bf16="
                                                                    f"{run.args.get('bf16')!r} (args from {run.args_file})"]
                    + [f"{m} non-finite at {n} of {k} logged steps, first at step {s}" for m, s, n, k in bad],
                    steps=(first, run.last_step or first), metrics=tuple(b[0] for b in bad))]


for _symptom in ("HD301", "HD302", "HD303", "HD305", "HD306"):
    causes(_symptom, "HD307")
