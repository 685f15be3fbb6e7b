"""Evaluation checks: eval_loss missing, the best-model metric never produced (and what that leaves behind:
a checkpoint without its state, early stopping switched off), eval_loss faked by a fallback."""
from __future__ import annotations

import re

import numpy as np

from ..diagnosis import Severity
from . import causes, check, finding
from ._util import fmt, is_higgs_run, steps_text
from ..hf_args import best_metric_name

EVAL_LOSS_RE = re.compile(r"^eval_(?:.+_)?loss$")
EVAL_RUNTIME_RE = re.compile(r"^eval_(?:.+_)?runtime$")
_SET_TO_RE = re.compile(r"set to '([^']*)'")


def evaluations(run) -> dict[int, set[str]]:
    """step -> the eval_* metrics logged at that step (both sources)."""
    out: dict[int, set[str]] = {}
    for metric in run.metrics:
        if metric.startswith("eval_"):
            for step in np.unique(run.all_steps(metric)).tolist():
                out.setdefault(int(step), set()).add(metric)
    return out


def evaluations_without_loss(evs: dict[int, set[str]]) -> tuple[list[int], list[int]]:
    """(steps of the evaluations that ran, those of them that logged no eval loss)."""
    ran = sorted(s for s, ms in evs.items() if any(EVAL_RUNTIME_RE.match(m) for m in ms))
    return ran, [s for s in ran if not any(EVAL_LOSS_RE.match(m) for m in evs[s])]


def _events(run, kind: str):
    return [e for e in run.log_events if e.kind == kind]


@check("HD101", "eval-loss-missing", rank=10)
def eval_loss_missing(run, t):
    """Evaluations ran but logged no `eval_loss`.

    What it detects: evaluation steps that logged `eval_runtime` (TensorBoard `eval/runtime`) and no
    loss. Critical when the best-model metric is `eval_loss` (explicitly, or by default through
    `load_best_model_at_end=True`), or the console log holds the `eval_loss` KeyError: the Trainer
    raises `KeyError: "The metric_for_best_model training argument is set to 'eval_loss', which is not
    found in the evaluation metrics"` at the first save that follows an evaluation.

    Why it happens: `Trainer.prediction_step` computes the loss only when `has_labels` (every name in
    `label_names` is a non-None key of the batch) or when `label_names` is empty and the model can
    return a loss. `label_names` defaults to the forward parameters whose name contains "label":
    `HiggsAudioModel` gives `['label_ids', 'label_audio_ids']`, but a wrapper with `forward(**kwargs)`
    (no `config`, so no model_config summary in the logs) or a `PeftModel` gives `[]`, and
    `PeftModelForCausalLM` gives `['labels']`, which a Higgs batch does not have; for other models the
    evaluation batches may lack one of the label arguments. The loss is then `None`, and
    `evaluation_loop` writes no `eval_loss`. A `compute_metrics` that returns `eval_loss` does not
    help: it runs only when predictions and labels exist.

    Example: `4 evaluations (steps 50-200) logged eval_runtime, eval_samples_per_second,
    eval_steps_per_second and no eval_loss; metric_for_best_model='eval_loss'`.

    Fix: set `label_names` to the label arguments of the model's forward and make sure the evaluation
    batches contain them: for Higgs Audio `label_names=["label_ids", "label_audio_ids"]` (the two label
    arguments of `HiggsAudioModel.forward`), e.g. `["labels"]` for a causal LM; or use a
    `prediction_step` that always computes the loss (`higgs_diag.trainer.HiggsAudioTrainer` does).
    Never fill in `eval_loss = 0.0`: the best checkpoint becomes arbitrary (see eval-loss-constant).
    """
    evs = evaluations(run)
    ran, without = evaluations_without_loss(evs)
    if not without:
        return
    best = best_metric_name(run.args)
    keyerrors = _events(run, "metric-keyerror")
    wants_loss = (best is not None and EVAL_LOSS_RE.match(best)) or any("eval_loss" in e.text for e in keyerrors)
    ev = [f"{len(without)} of {len(ran)} evaluations ({steps_text(without[0], without[-1])}) logged no eval loss; "
          f"they logged: {', '.join(sorted(evs[without[0]]))}"]
    if best:
        ev.append(f"metric_for_best_model resolves to {best!r} (args: metric_for_best_model="
                  f"{run.arg('metric_for_best_model')!r}, load_best_model_at_end={run.arg('load_best_model_at_end')!r})"
                  + (": the Trainer raises KeyError when it saves after an evaluation" if wants_loss else ""))
    if run.args is not None:
        ev.append(f"label_names={run.arg('label_names')!r}")
    if run.args is not None and run.model_config is None:
        ev.append("no model_config text summary: the model has no `config` (a wrapper nn.Module), so "
                  "label_names defaults to [] and prediction_step computes no loss")
    for e in keyerrors[:1]:
        ev.append(f"{e.file}:{e.line}: {e.text}")
    yield finding(Severity.CRITICAL if wants_loss else Severity.WARNING,
                  f"{len(without)} of {len(ran)} evaluations ran without eval_loss",
                  evidence=ev, steps=(without[0], without[-1]), metrics=("eval_loss", "eval_runtime"),
                  fix_detail="" if is_higgs_run(run) or run.model_config is None else
                  "This run is not a Higgs Audio run: use its own label argument names.")


@check("HD102", "best-metric-missing", rank=20)
def best_metric_missing(run, t):
    """The metric that selects the best checkpoint was never produced: training stops with `KeyError` at a save.

    What it detects: the `metric_for_best_model` KeyError in the console log, or a best-model metric
    (`metric_for_best_model`, or `eval_loss` through `load_best_model_at_end=True`) that the logged
    evaluations never contain (critical).

    Why it happens: `_save_checkpoint` looks up `metrics[metric_for_best_model]` whenever evaluation
    and save fall on the same step (with `ReduceLROnPlateau`, `_evaluate` does it at every evaluation)
    and raises `KeyError` when the metric is missing, after writing the weights and before writing
    `trainer_state.json`. The metric is missing when the evaluation computes no loss (see
    eval-loss-missing) or when `compute_metrics` does not return it (a name copied from another task, a
    typo). `load_best_model_at_end=True` without `metric_for_best_model` means `eval_loss`.

    Example: `train.log:212: KeyError: "The metric_for_best_model training argument is set to
    'eval_loss'..."`; 1 evaluation logged only eval_runtime, eval_samples_per_second,
    eval_steps_per_second.

    Fix: make the metric exist (for `eval_loss`: `label_names=["label_ids", "label_audio_ids"]`, or
    `higgs_diag.trainer.HiggsAudioTrainer`), or set `metric_for_best_model` to a metric your
    `compute_metrics` really returns.
    """
    best = best_metric_name(run.args)
    keyerrors = _events(run, "metric-keyerror")
    evidence = [f"{e.file}:{e.line}: {e.text[:300]}" for e in keyerrors[:2]]
    steps = None
    evs = evaluations(run)
    if best and evs:
        have = set().union(*evs.values())
        if best not in have:
            evidence.append(f"metric_for_best_model resolves to {best!r}, but {len(evs)} evaluation(s) logged only: "
                            f"{', '.join(sorted(have))}")
            steps = (min(evs), max(evs))
    if not evidence:
        return
    name = best or next((m.group(1) for e in keyerrors if (m := _SET_TO_RE.search(e.text))), "?")
    yield finding(Severity.CRITICAL, f"The best-model metric {name!r} was never produced", evidence=evidence,
                  steps=steps, metrics=("eval_loss",),
                  fix_detail="" if EVAL_LOSS_RE.match(name) else f"Here: return {name!r} from compute_metrics.")


@check("HD105", "checkpoint-incomplete", rank=22)
def checkpoint_without_state(run, t):
    """The last checkpoint holds weights and optimizer but no `trainer_state.json`: its save stopped halfway.

    What it detects: the last numbered checkpoint folder has model (or adapter) weights and
    `optimizer.pt` but no `trainer_state.json` (warning).

    Why it happens: `_save_checkpoint` writes the weights, optimizer, scheduler and RNG state first and
    `trainer_state.json` last; in between it looks up the best-model metric, so a missing metric
    (best-metric-missing) raises `KeyError` exactly there. A process killed during the save (out of
    memory, pre-emption, a full disk) leaves the same folder. Resuming from it loads the weights,
    optimizer and scheduler but not the step count: the run counts from step 0 again (training
    `max_steps` more steps, past the end of the restored schedule) and sees the data from the start.

    Example: `checkpoint-100/ holds model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth,
    training_args.bin but no trainer_state.json`.

    Fix: fix what stopped the save (the best-model metric: see best-metric-missing; memory or disk
    space), then resume from the last complete checkpoint, not from this one.
    """
    cps = [c for c in run.checkpoints if c.step is not None]
    if not cps:
        return
    last = cps[-1]
    if last.has_trainer_state or not (last.has_full_model or last.has_adapter) or not last.has_optimizer:
        return
    complete = [c for c in cps if c.has_trainer_state]
    yield finding(
        Severity.WARNING, f"checkpoint-{last.step} has weights but no trainer_state.json: its save stopped halfway",
        evidence=[f"{last.path} holds {', '.join(last.files[:8])} but no trainer_state.json",
                  f"last complete checkpoint: {complete[-1].path}" if complete else "no complete checkpoint"],
        steps=(last.step, last.step))


@check("HD106", "best-metric-missing", rank=21)
def early_stopping_disabled(run, t):
    """`EarlyStoppingCallback` disabled itself: its metric was not in the evaluation metrics.

    What it detects: the `early stopping is disabled` warning in the console log (warning).

    Why it happens: `EarlyStoppingCallback` compares `metric_for_best_model` at each evaluation; when
    the metric is missing (no eval loss computed, or `compute_metrics` does not return it) it only logs
    "early stopping required metric_for_best_model, but did not find ... so early stopping is
    disabled" and the run trains to `max_steps`, however the model does.

    Example: `train.log:80: early stopping required metric_for_best_model, but did not find eval_loss so
    early stopping is disabled`.

    Fix: make the metric exist (for `eval_loss`: `label_names=["label_ids", "label_audio_ids"]`), or set
    `metric_for_best_model` to a metric your `compute_metrics` returns.
    """
    es = _events(run, "early-stopping-disabled")
    if not es:
        return
    # the missing eval loss explains it when early stopping looked for one
    _ran, without = evaluations_without_loss(evaluations(run))
    looked_for_loss = "loss" in es[0].text or EVAL_LOSS_RE.match(best_metric_name(run.args) or "")
    yield finding(Severity.WARNING, "Early stopping is disabled: its metric is not in the evaluation metrics",
                  evidence=[f"{e.file}:{e.line}: {e.text[:300]}" for e in es[:2]],
                  caused_by="HD101" if without and looked_for_loss else None)


causes("HD102", "HD101")
causes("HD105", "HD102")
causes("HD103", "HD401", "HD811", "HD501")  # a model whose weights never change evaluates the same


@check("HD103", "eval-loss-constant", rank=15)
def eval_loss_constant(run, t):
    """`eval_loss` is the same number at every evaluation: a fallback wrote it, not the model.

    What it detects: two or more evaluations whose `eval_loss` is exactly equal (0.0 above all, the
    value of the well-known fallback `eval_result.metrics["eval_loss"] = 0.0`), or any `eval_loss`
    of exactly 0.0, which a cross-entropy on real data never reaches. Critical for a 0.0, or when
    `eval_loss` selects the best checkpoint.

    Why it happens: a real evaluation loss changes as the weights change. Identical values mean the
    weights did not change (no `backward()`, a learning rate of 0: see no-learning, which then explains
    this finding) or a fallback wrote them: an `evaluation_loop`
    override inserts a constant when the Trainer produced no `eval_loss` (the real cause: see
    eval-loss-missing) to avoid the KeyError. Training then goes on, `best_metric` is that constant,
    every checkpoint ties, and `load_best_model_at_end` restores an arbitrary (the first) checkpoint.

    Example: `eval_loss = 0.0 at all 5 evaluations (steps 40-200); best_metric 0.0,
    best_model_checkpoint checkpoint-40`.

    Fix: delete the `eval_loss` fallback and make the Trainer compute the loss in evaluation
    (`label_names=["label_ids", "label_audio_ids"]` for Higgs Audio, your model's label arguments
    otherwise, or `higgs_diag.trainer.HiggsAudioTrainer`).
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
    critical = zero.any() or (constant and best_metric_name(run.args) == "eval_loss")
    yield finding(
        Severity.CRITICAL if critical else Severity.WARNING,
        f"eval_loss is a constant ({fmt(v[0]) if constant else '0.0'}): a fallback hides the real value"
        if zero.any() else f"eval_loss is the same ({fmt(v[0])}) at every evaluation: the weights never change, or a "
                           f"fallback writes it",
        evidence=evidence, steps=(int(idx[0]), int(idx[-1])), metrics=("eval_loss",))
