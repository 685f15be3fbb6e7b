"""Evaluation checks: eval_loss missing, the best-model metric never produced, eval_loss faked by a fallback."""
from __future__ import annotations

import re

import numpy as np

from ..diagnosis import Severity
from . import causes, check, finding
from ._util import fmt, is_higgs_run, steps_text
from .config_checks import best_metric_name as resolve_best_metric

EVAL_LOSS_RE = re.compile(r"^eval_(?:.+_)?loss$")
EVAL_RUNTIME_RE = re.compile(r"^eval_(?:.+_)?runtime$")

LABEL_NAMES_FIX = (
    'Pass label_names=["label_ids", "label_audio_ids"] to TrainingArguments, so that the Trainer computes the '
    "loss in prediction_step (HiggsAudioModel.forward takes exactly these two label arguments), or use "
    "higgs_diag.trainer.HiggsAudioTrainer, whose prediction_step always computes the loss. Do not paper over "
    "it with a fallback that sets eval_loss = 0.0."
)


GENERIC_LABEL_NAMES_FIX = (
    "Set label_names in TrainingArguments to the label arguments of your model's forward (e.g. ['labels']) and "
    "make sure the evaluation batches contain them, or override prediction_step so that it always computes the "
    "loss. Do not paper over it with a fallback that sets eval_loss = 0.0."
)


def label_names_fix(run) -> str:
    return LABEL_NAMES_FIX if is_higgs_run(run) else GENERIC_LABEL_NAMES_FIX


def best_metric_name(run) -> str | None:
    """The metric the Trainer compares for the best checkpoint, as it names it in the eval metrics."""
    return resolve_best_metric(run.args)


def evaluations(run) -> dict[int, set[str]]:
    """step -> the eval_* metrics logged at that step (both sources)."""
    out: dict[int, set[str]] = {}
    for metric in run.metrics:
        if metric.startswith("eval_"):
            for step in np.unique(run.all_steps(metric)).tolist():
                out.setdefault(int(step), set()).add(metric)
    return out


def _keyerror_events(run):
    return [e for e in run.log_events if e.kind == "metric-keyerror"]


@check("HD101", "eval-loss-missing", rank=10)
def eval_loss_missing(run, t):
    """Evaluations ran but logged no `eval_loss`.

    What it detects: evaluation steps that logged `eval_runtime` (TensorBoard `eval/runtime`) and no
    loss. Critical when the best-model metric is `eval_loss` (explicitly, or by default through
    `load_best_model_at_end=True`): the Trainer raises `KeyError: "The metric_for_best_model training
    argument is set to 'eval_loss', which is not found in the evaluation metrics"` at the first save
    that follows an evaluation.

    Why it happens: `Trainer.prediction_step` computes the loss only when `has_labels` (every name in
    `label_names` is a non-None key of the batch) or when `label_names` is empty and the model can
    return a loss. `label_names` defaults to the forward parameters whose name contains "label":
    `HiggsAudioModel` gives `['label_ids', 'label_audio_ids']`, but a wrapper with `forward(**kwargs)`
    or a `PeftModel` gives `[]`, and `PeftModelForCausalLM` gives `['labels']`, which a Higgs batch does
    not have. The loss is then `None`, and `evaluation_loop` writes no `eval_loss`. A `compute_metrics`
    that returns `eval_loss` does not help: it runs only when predictions and labels exist.

    Example: `4 evaluations (steps 50-200) logged eval_runtime, eval_samples_per_second,
    eval_steps_per_second and no eval_loss; metric_for_best_model='eval_loss'`.

    Fix: `label_names=["label_ids", "label_audio_ids"]` in TrainingArguments, or a `prediction_step`
    that always computes the loss (`higgs_diag.trainer.HiggsAudioTrainer` does). Never fill in
    `eval_loss = 0.0`: the best checkpoint becomes arbitrary (see eval-loss-constant).
    """
    evs = evaluations(run)
    ran = sorted(s for s, ms in evs.items() if any(EVAL_RUNTIME_RE.match(m) for m in ms))
    if not ran:
        return
    without = [s for s in ran if not any(EVAL_LOSS_RE.match(m) for m in evs[s])]
    if not without:
        return
    best = best_metric_name(run)
    keyerrors = _keyerror_events(run)
    wants_loss = (best is not None and EVAL_LOSS_RE.match(best)) or any("eval_loss" in e.text for e in keyerrors)
    sev = Severity.CRITICAL if wants_loss else Severity.WARNING
    keys = sorted(evs[without[0]])
    ev = [f"{len(without)} of {len(ran)} evaluations ({steps_text(without[0], without[-1])}) logged no eval loss; "
          f"they logged: {', '.join(keys)}"]
    if best:
        ev.append(f"metric_for_best_model resolves to {best!r} (args: metric_for_best_model="
                  f"{run.arg('metric_for_best_model')!r}, load_best_model_at_end={run.arg('load_best_model_at_end')!r})")
    if run.args is not None:
        ev.append(f"label_names={run.arg('label_names')!r}")
    if run.args is not None and run.model_config is None:
        ev.append("no model_config text summary: the model has no `config` (a wrapper nn.Module), so "
                  "label_names defaults to [] and prediction_step computes no loss")
    for e in keyerrors[:1]:
        ev.append(f"{e.file}:{e.line}: {e.text}")
    explanation = (
        "The Trainer computed no loss during evaluation: prediction_step calls compute_loss only when every "
        "name in label_names is a non-None key of the batch (or label_names is empty and the model can return "
        "a loss). "
    )
    if is_higgs_run(run) or run.model_config is None:
        explanation += ("A wrapper with forward(**kwargs), a PeftModel or PeftModelForCausalLM does not expose "
                        "label_ids/label_audio_ids, so label_names is [] or ['labels'] and the loss is dropped.")
    else:
        explanation += ("label_names defaults to the forward arguments whose name contains 'label'; when the "
                        "evaluation batches lack one of them, or the model is wrapped, the loss is dropped.")
    if wants_loss:
        explanation += (" Because the best checkpoint is chosen by eval_loss, the Trainer raises "
                        "KeyError: 'eval_loss' when it saves after an evaluation.")
    yield finding(sev, "Evaluations ran without eval_loss" + (" while eval_loss selects the best checkpoint"
                                                             if wants_loss else ""),
                  evidence=ev, explanation=explanation, fix=label_names_fix(run), steps=(without[0], without[-1]),
                  metrics=("eval_loss", "eval_runtime"))


@check("HD102", "best-metric-missing", rank=20)
def best_metric_missing(run, t):
    """The metric that selects the best checkpoint was never produced (the `KeyError` at save).

    What it detects: the `metric_for_best_model` KeyError in the console log; a best-model metric that
    evaluations never logged; the last checkpoint holding model and optimizer files but no
    `trainer_state.json` (the Trainer raises the KeyError in `_save_checkpoint` after writing the
    weights and before writing the state); `EarlyStoppingCallback` silently disabled.

    Why it happens: `_save_checkpoint` looks up `metrics[metric_for_best_model]` whenever evaluation
    and save fall on the same step; with `ReduceLROnPlateau` `_evaluate` does it at every evaluation.
    `load_best_model_at_end=True` without `metric_for_best_model` means `eval_loss`.
    `EarlyStoppingCallback` only logs "early stopping is disabled" when its metric is missing.

    Example: `checkpoint-100/ holds model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth,
    training_args.bin but no trainer_state.json` and `train.log:212: KeyError: "The
    metric_for_best_model training argument is set to 'eval_loss'..."`.

    Fix: make the metric exist (for `eval_loss`: `label_names=["label_ids", "label_audio_ids"]`), or
    set `metric_for_best_model` to a metric your `compute_metrics` really returns.
    """
    best = best_metric_name(run)
    evidence: list[str] = []
    steps = None
    sev = None
    keyerrors = _keyerror_events(run)
    for e in keyerrors[:2]:
        evidence.append(f"{e.file}:{e.line}: {e.text[:300]}")
        sev = Severity.CRITICAL
    evs = evaluations(run)
    if best and evs:
        have = set().union(*evs.values())
        if best not in have:
            evidence.append(f"metric_for_best_model resolves to {best!r}, but {len(evs)} evaluation(s) logged only: "
                            f"{', '.join(sorted(have))}")
            sev = Severity.CRITICAL
            steps = (min(evs), max(evs))
    cps = [c for c in run.checkpoints if c.step is not None]
    if cps:
        last = cps[-1]
        if not last.has_trainer_state and (last.has_full_model or last.has_adapter) and last.has_optimizer:
            evidence.append(f"{last.path} holds {', '.join(last.files[:8])} but no trainer_state.json: the save "
                            f"stopped between the weights and the state")
            sev = Severity.CRITICAL
            steps = steps or (last.step, last.step)
    es = [e for e in run.log_events if e.kind == "early-stopping-disabled"]
    if es:
        evidence.append(f"{es[0].file}:{es[0].line}: {es[0].text[:300]}")
        sev = sev or Severity.WARNING
    if sev is None:
        return
    name = best or next((re.search(r"set to '([^']*)'", e.text).group(1) for e in keyerrors
                         if re.search(r"set to '([^']*)'", e.text)), None)
    title = (f"The best-model metric {name!r} was never produced" if name else
             "The best-model metric was never produced")
    if keyerrors or any("no trainer_state.json" in e for e in evidence):
        title += ": training stopped with KeyError at the checkpoint save"
    yield finding(
        sev, title, evidence=evidence,
        explanation="The Trainer looks the best-model metric up in the evaluation metrics whenever it saves after "
                    "an evaluation; when the metric is missing it raises KeyError after writing the weights and "
                    "before writing trainer_state.json. EarlyStoppingCallback instead disables itself silently.",
        fix=label_names_fix(run) if (name or "").endswith("loss") else
        f"Set metric_for_best_model to a metric that evaluation really logs, or return {name!r} from compute_metrics.",
        steps=steps, metrics=("eval_loss",))


causes("HD102", "HD101")


@check("HD103", "eval-loss-constant", rank=15)
def eval_loss_constant(run, t):
    """`eval_loss` is the same number at every evaluation: a fallback wrote it, not the model.

    What it detects: two or more evaluations whose `eval_loss` is exactly equal (0.0 above all, the
    value of the well-known fallback `eval_result.metrics["eval_loss"] = 0.0`), or any `eval_loss`
    of exactly 0.0, which a cross-entropy on real data never reaches.

    Why it happens: an `evaluation_loop` override inserts a constant when the Trainer produced no
    `eval_loss` (the real cause: see eval-loss-missing) to avoid the KeyError. Training then goes on,
    `best_metric` is that constant, every checkpoint ties, and `load_best_model_at_end` restores an
    arbitrary (the first) checkpoint.

    Example: `eval_loss = 0.0 at all 5 evaluations (steps 40-200); best_metric 0.0,
    best_model_checkpoint checkpoint-40`.

    Fix: remove the fallback and make the Trainer compute the loss in evaluation
    (`label_names=["label_ids", "label_audio_ids"]`, or `higgs_diag.trainer.HiggsAudioTrainer`).
    """
    s = run.series("eval_loss")
    vals = s.to_numpy(dtype="float64")
    fin = np.isfinite(vals)
    if fin.sum() == 0:
        return
    v = vals[fin]
    zero = v == 0.0
    constant = len(v) >= 2 and np.all(v == v[0])
    if not (constant or zero.any()):
        return
    idx = s.index[fin]
    evidence = []
    if constant:
        evidence.append(f"eval_loss = {fmt(v[0])} at all {len(v)} evaluations ({steps_text(idx[0], idx[-1])})")
    else:
        zs = idx[zero]
        evidence.append(f"eval_loss = 0.0 at {int(zero.sum())} of {len(v)} evaluations (first at step {zs[0]})")
    st = run.state
    if st is not None and st.best_metric is not None:
        evidence.append(f"best_metric {fmt(st.best_metric)}, best_model_checkpoint {st.best_model_checkpoint}")
    train = run.series("loss")
    tf = train[np.isfinite(train.to_numpy())]
    if len(tf) >= 2:
        evidence.append(f"meanwhile the train loss went {fmt(tf.iloc[0])} -> {fmt(tf.iloc[-1])}")
    sev = Severity.CRITICAL if (zero.any() or (constant and best_metric_name(run) == "eval_loss")) else Severity.WARNING
    yield finding(
        sev, f"eval_loss is a constant ({fmt(v[0]) if constant else '0.0'}): a fallback hides the real value",
        evidence=evidence,
        explanation="A real evaluation loss changes as the weights change and is never exactly 0.0 on real data. "
                    "A constant is what an evaluation_loop override writes when the Trainer produced no eval_loss. "
                    "Every checkpoint then ties, and load_best_model_at_end keeps an arbitrary one.",
        fix="Delete the eval_loss fallback and fix the cause: " + label_names_fix(run),
        steps=(int(idx[0]), int(idx[-1])), metrics=("eval_loss",))
