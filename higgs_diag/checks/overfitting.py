"""Generalisation: the held-out loss rises after its minimum (HD405), or rises while the metric the best
model is chosen by keeps improving (HD410)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import layout
from ..config import Thresholds
from ..diagnosis import Finding, Severity
from ..run.model import Run
from . import check, finding
from ._util import finite, fmt, loss_not_cross_entropy, smoothed_at
from ..hf_args import best_metric_name

# eval_* keys that measure the evaluation itself, not the model's quality
_NOT_QUALITY = ("_runtime", "_per_second", "num_tokens", "gen_len", "_epoch", "_step", "_samples")
_LOWER_IS_BETTER = re.compile(r"loss|wer|cer|err|perplexity|ppl|mse|mae|rmse|distance|der", re.I)
_THRESHOLDS = ("overfit_min_evals", "overfit_rise_fraction", "trend_min_points", "smooth_fraction",
               "plateau_min_improvement")


def _last_session(run: Run, metric: str) -> tuple[pd.Series, int]:
    """``run.series(metric)`` restricted to the points logged after the last time the step went back in
    reading order (one logging dir holding several runs or sessions), and how many points were left out.
    Sparse series such as evaluations from separate runs cannot be merged by step into one curve."""
    s = run.series(metric)
    if s.empty:
        return s, 0
    pos = run.source_positions(metric)  # the points run.series reads, in reading order
    steps = run.column("step")[pos].astype(np.int64)
    back = np.flatnonzero(np.diff(steps) < 0)
    if not len(back):
        return s, 0
    cut = int(back[-1]) + 1
    keep, ks = pos[cut:], steps[cut:]
    # the last point of each step (reading order), sorted by step, as run.series does
    order = np.argsort(ks, kind="stable")
    ss = ks[order]
    last = np.append(ss[1:] != ss[:-1], True)
    out = pd.Series(run.column("value")[keep[order[last]]], index=pd.Index(ss[last], dtype="int64", name="step"),
                    name=metric)
    return out, int(len(s) - len(out))


def _inferred_best_metric(run: Run) -> str | None:
    """The eval metric whose logged values hold trainer_state's ``best_metric`` (the one at
    ``best_model_checkpoint``'s step first, then eval_loss), for runs whose TrainingArguments are unknown."""
    st = run.state
    bm = st.best_metric if st else None
    if isinstance(bm, bool) or not isinstance(bm, (int, float)) or not math.isfinite(bm):
        return None
    ck_step = layout.step_in_path(st.best_model_checkpoint)
    candidates = []
    for metric in run.metrics:
        if not metric.startswith("eval_") or any(k in metric for k in _NOT_QUALITY):
            continue
        s = finite(run.series(metric))
        close = s[np.isclose(s.to_numpy(), bm, rtol=1e-6, atol=1e-12)]
        if not close.empty:
            candidates.append((ck_step is not None and ck_step in close.index, metric == "eval_loss", metric))
    return max(candidates)[2] if candidates else None


def _greater_is_better(run: Run, metric: str) -> bool:
    g = run.arg("greater_is_better")
    if isinstance(g, bool):
        return g
    return not _LOWER_IS_BETTER.search(metric[5:] if metric.startswith("eval_") else metric)


def _best_of(run: Run, metric: str) -> tuple[int, float] | None:
    s = finite(run.series(metric))
    if s.empty:
        return None
    gib = _greater_is_better(run, metric)
    return int(s.idxmax() if gib else s.idxmin()), float(s.max() if gib else s.min())


@dataclass
class _Rise:
    """An eval_loss that rises after its minimum, and what else the logs say about it."""

    vmin: float
    smin: int
    last: float
    slast: int
    evidence: list[str] = field(default_factory=list)
    train_falls: bool | None = None  # None: no train loss to judge by
    best_metric: str | None = None  # the metric for the best model, when it is not eval_loss
    other_improves: bool = False  # ... and its best value comes after the eval_loss minimum

    @property
    def rise(self) -> float:
        return (self.last - self.vmin) / self.vmin


def eval_rise(run: Run, t: Thresholds) -> _Rise | None:
    ev_all, dropped = _last_session(run, "eval_loss")
    ev_loss = finite(ev_all)
    if len(ev_loss) < max(2, t.overfit_min_evals):
        return None
    vmin, smin = float(ev_loss.min()), int(ev_loss.idxmin())
    after = ev_loss[ev_loss.index > smin]
    # the rise spans overfit_min_evals consecutive evaluations counting the minimum itself
    if not vmin > 0 or after.empty or len(after) < t.overfit_min_evals - 1:
        return None
    limit = vmin * (1 + t.overfit_rise_fraction)
    last = float(after.iloc[-1])
    if not (last > limit and float(after.iloc[-max(1, t.overfit_min_evals - 1):].median()) > limit):
        return None
    r = _Rise(vmin, smin, last, int(after.index[-1]))
    r.evidence.append(f"eval_loss reaches its minimum {fmt(vmin)} at step {smin} ({len(ev_loss)} evaluations); "
                      f"the {len(after)} evaluations after it are higher, the last {fmt(last)} at step {r.slast} "
                      f"(+{r.rise:.1%})")
    if dropped:
        r.evidence.append(f"only the last session's evaluations are compared: the logs hold {dropped} earlier "
                          "eval_loss point(s) of other sessions (see resume-discontinuity)")
    _judge_train_loss(run, t, r)
    _judge_other_metrics(run, r)
    _best_checkpoint_evidence(run, ev_loss, r)
    return r


def _judge_train_loss(run: Run, t: Thresholds, r: _Rise) -> None:
    tl = finite(run.series("loss"))
    if loss_not_cross_entropy(run) is not None or len(tl) < 2:
        return
    # the smoothed curve (smoothed(tl, t.smooth_fraction)) is read at two points: compute only those
    i = max(int(tl.index.searchsorted(r.smin, side="right")) - 1, 0)  # value_at's point
    ends = smoothed_at(tl, t.smooth_fraction, [i, len(tl) - 1]) if len(tl) >= t.trend_min_points \
        else tl.to_numpy(dtype="float64")[[i, len(tl) - 1]]
    at = (int(tl.index[i]), float(ends[0]))
    end = (int(tl.index[-1]), float(ends[1]))
    if at[0] < end[0]:
        r.train_falls = end[1] < at[1] * (1 - t.plateau_min_improvement)
        r.evidence.append(f"smoothed train loss {fmt(at[1])} at step {at[0]} -> {fmt(end[1])} at step {end[0]} "
                          + ("(still falling)" if r.train_falls else "(not falling)"))


def _judge_other_metrics(run: Run, r: _Rise) -> None:
    """The metric the best model is chosen by (from the args, else inferred from best_metric), and whether
    it keeps improving after the eval_loss minimum; without one, the eval metrics that do."""
    name = best_metric_name(run.args)
    if name:
        m = run.arg("metric_for_best_model")
        how = (f"TrainingArguments.metric_for_best_model = {m!r}" if m else
               "load_best_model_at_end=True without metric_for_best_model (defaults to loss)")
    else:
        name = _inferred_best_metric(run)
        how = (f"inferred: trainer_state best_metric {fmt(run.state.best_metric)} is a logged {name} value"
               if name else "")
    if name:
        r.evidence.append(f"metric for the best model: {name} ({how})")
        best = _best_of(run, name) if name != "eval_loss" else None
        if best is not None:
            r.best_metric = name
            r.other_improves = best[0] > r.smin
            r.evidence.append(f"{name} is best ({fmt(best[1])}) at step {best[0]}, "
                              + ("after the eval_loss minimum: it keeps improving while eval_loss rises"
                                 if r.other_improves else "not after the eval_loss minimum: it stopped improving too"))
        return
    for metric in run.metrics:
        if not metric.startswith("eval_") or "loss" in metric or any(k in metric for k in _NOT_QUALITY):
            continue
        best = _best_of(run, metric) if len(finite(run.series(metric))) >= 2 else None
        if best is not None and best[0] > r.smin:
            r.evidence.append(f"{metric} keeps improving after the eval_loss minimum (best {fmt(best[1])} "
                              f"at step {best[0]}): if it is the metric you select by, judge by it")


def _best_checkpoint_evidence(run: Run, ev_loss: pd.Series, r: _Rise) -> None:
    st = run.state
    ck = layout.step_in_path(st.best_model_checkpoint) if st else None
    if ck is not None:
        at_ck = ev_loss.get(ck)
        r.evidence.append(f"best_model_checkpoint {st.best_model_checkpoint} (step {ck}) "
                          + ("is the eval_loss minimum" if ck == r.smin else
                             f"is not the eval_loss minimum (step {r.smin})"
                             + (f"; eval_loss there {fmt(at_ck)}" if at_ck is not None else "")))
    if run.arg("load_best_model_at_end") is not None:
        r.evidence.append(f"TrainingArguments.load_best_model_at_end = {run.arg('load_best_model_at_end')}")


@check("HD405", "overfitting", rank=45, thresholds=_THRESHOLDS)
def overfitting(run: Run, t: Thresholds) -> list[Finding]:
    """Evaluation loss rises after its minimum while the training loss keeps falling.

    What it detects: `eval_loss` has at least `overfit_min_evals` evaluations from its minimum on, and both
    the last evaluation and the median of the last `overfit_min_evals` - 1 exceed the minimum by more
    than `overfit_rise_fraction`. Warning when the smoothed train loss keeps falling over the same
    steps (by `plateau_min_improvement`) or is not logged; info when it does not fall either. When
    the metric for the best model is another one that keeps improving, that is HD410 instead. Only
    the last session's evaluations are compared when the steps go back (several runs in one logging
    dir). Reports whether `best_model_checkpoint` is the eval_loss minimum.

    Why it happens: The held-out loss stopped improving and rises while the model keeps fitting the
    training data: it memorises the training samples (for Higgs Audio, the training speakers and
    utterances) rather than learning what carries over, and loses calibration on held-out audio. Too
    many epochs over a small dataset, a learning rate too high for fine-tuning, a large LoRA rank
    without dropout. Checkpoints after the eval_loss minimum generalise worse by this measure.

    Example: eval_loss minimum 0.2088 at step 12000, then 3 evaluations above it, last 0.2393 at step 15000
    (+14.6%); train loss 0.153 -> 0.121 over the same steps; best_model_checkpoint checkpoint-15000
    is not the eval_loss minimum.

    Fix: Keep the best checkpoint: `load_best_model_at_end=True` with `metric_for_best_model="eval_loss"`
    (or your task metric) and `save_steps` a multiple of `eval_steps`; stop early with
    `EarlyStoppingCallback(early_stopping_patience=3)`; train fewer epochs or with a lower
    `learning_rate`; add regularisation (`weight_decay=0.01`, LoRA `lora_dropout=0.1`) or more data.
    """
    r = eval_rise(run, t)
    if r is None or r.other_improves:
        return []
    trend = {True: " while the train loss keeps falling: overfitting",
             False: " but the train loss does not fall either", None: ""}[r.train_falls]
    return [finding(
        Severity.INFO if r.train_falls is False else Severity.WARNING,
        f"eval_loss rises from {fmt(r.vmin)} (step {r.smin}) to {fmt(r.last)} (step {r.slast})" + trend,
        evidence=r.evidence, steps=(r.smin, r.slast),
        metrics=("eval_loss", "loss") + ((r.best_metric,) if r.best_metric else ()))]


@check("HD410", "overfitting", rank=46, thresholds=_THRESHOLDS)
def loss_rises_metric_improves(run: Run, t: Thresholds) -> list[Finding]:
    """eval_loss rises after its minimum while the metric the best model is chosen by keeps improving.

    What it detects: The eval_loss rise of HD405, when `metric_for_best_model` (from the TrainingArguments,
    or inferred from trainer_state's `best_metric`) is another metric, such as WER or accuracy, whose
    best value comes after the eval_loss minimum. Info.

    Why it happens: Common for Whisper-style and other sequence fine-tuning: the model grows over-confident
    on the tokens it still gets wrong, so their cross-entropy (and the mean eval_loss) rises while the
    share it gets right, which the task metric measures, keeps improving. The loss is then not the
    measure to select checkpoints by.

    Example: eval_loss rises from 1.0 (step 300) to 1.25 (step 600) while eval_wer improves from 25 to 19
    over the same evaluations.

    Fix: Judge and select by the task metric: `load_best_model_at_end=True` with `metric_for_best_model`
    set to it (and `greater_is_better` right for it), `save_steps` a multiple of `eval_steps`, and
    `EarlyStoppingCallback` on that metric; stop when it stops improving.
    """
    r = eval_rise(run, t)
    if r is None or not r.other_improves:
        return []
    return [finding(
        Severity.INFO,
        f"eval_loss rises after step {r.smin} (+{r.rise:.0%}) while {r.best_metric}, the metric for the best "
        "model, keeps improving",
        evidence=r.evidence, steps=(r.smin, r.slast), metrics=("eval_loss", "loss", r.best_metric))]
