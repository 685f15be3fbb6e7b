"""Configuration contradictions readable from the logged TrainingArguments and model config.

``validate_args`` is the one implementation: analyze runs it on the logged `args`, and the bundled
trainer (``higgs_diag.trainer``) runs it on its TrainingArguments before training starts, with
``at_startup=True`` for the advice that only makes sense before a run (analyze judges the logged values
instead: the learning rate by HD501, the NaN filter by the NaN it actually hid).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..config import Thresholds
from ..diagnosis import Severity
from . import causes, check, finding

# Seed 000's hyperparameter table (Higgs Audio v2 zero-shot voice cloning, 800 h, 8 GPUs) and its Arabic
# variant: the ranges the trainer's start-up advice compares against. higgs_diag.trainer.presets builds its
# TrainingArguments overrides from the same numbers.
RECOMMENDED = {
    "default": {"learning_rate": (5e-5, 1e-4), "warmup_steps": (100, 500), "per_device_train_batch_size": (2, 4)},
    "arabic": {"learning_rate": (1e-5, 3e-5), "warmup_steps": (500, 1000), "per_device_train_batch_size": (2, 4)},
}
_ARABIC = {"ar", "ara", "arabic"}


def best_metric_name(args: dict | None) -> str | None:
    """The metric the Trainer compares for the best checkpoint, named as in the eval metrics (HF's rule:
    ``load_best_model_at_end`` without ``metric_for_best_model`` means ``loss``; an ``eval_`` prefix is added)."""
    if not args:
        return None
    m = args.get("metric_for_best_model")
    if m is None and args.get("load_best_model_at_end"):
        m = "loss"
    if not m:
        return None
    return str(m) if str(m).startswith("eval_") else f"eval_{m}"


def _strategy(args: dict, name: str) -> str:
    v = args.get(name)
    if v is None and name == "eval_strategy":
        v = args.get("evaluation_strategy")
    return str(v or "no").split(".")[-1].lower()  # "IntervalStrategy.STEPS" -> "steps"


def _steps_value(args: dict, name: str, fallback: str | None = None):
    v = args.get(name)
    if v is None and fallback:
        v = args.get(fallback)
    return v


def validate_args(args: dict, *, at_startup: bool = False, produced_metrics: Iterable[str] | None = None,
                  language: str | None = None, thresholds: Thresholds | None = None
                  ) -> list[tuple[str, Severity, str, str]]:
    """Contradictions in TrainingArguments given as a dict (``args.to_dict()`` or the logged JSON).
    Returns (code, severity, message, fix) tuples; ``HD601`` is the check code for all of them.

    Always: ``save_steps`` a multiple of ``eval_steps`` and matching strategies when keeping the best
    model; a best-model metric while evaluation is off; ``eval_steps`` beyond ``max_steps``;
    ``greater_is_better=True`` for a loss metric (the worst checkpoint would be kept).
    ``produced_metrics`` (the metric names evaluation will produce, e.g. ``{"eval_loss", ...}``): the
    best-model metric must be one of them. ``at_startup=True`` adds the advice given before a run:
    ``logging_nan_inf_filter=True`` hides NaN losses, and learning rate / warmup outside seed 000's
    recommended range (``language="ar"`` uses its Arabic row).
    """
    out = []
    eval_s = _strategy(args, "eval_strategy")
    save_s = _strategy(args, "save_strategy")
    best = args.get("metric_for_best_model")
    lbme = bool(args.get("load_best_model_at_end"))
    eval_steps = _steps_value(args, "eval_steps", "logging_steps")
    save_steps = args.get("save_steps")
    if lbme and eval_s == "steps" and save_s == "steps" and eval_steps and save_steps:
        try:
            es, ss = float(eval_steps), float(save_steps)
            if es > 0 and (ss / es) != int(ss / es):
                out.append(("HD601", Severity.CRITICAL,
                            f"load_best_model_at_end=True with save_steps={save_steps} not a multiple of "
                            f"eval_steps={eval_steps}: TrainingArguments raises ValueError, and a best checkpoint "
                            f"could only be kept at steps where both fall",
                            f"Use save_steps a multiple of eval_steps, e.g. eval_steps={eval_steps}, "
                            f"save_steps={int(max(es, round(ss / es) * es))}."))
        except (TypeError, ValueError):
            pass
    if lbme and eval_s != save_s:
        out.append(("HD601", Severity.CRITICAL,
                    f"load_best_model_at_end=True with eval_strategy={eval_s!r} and save_strategy={save_s!r}: "
                    f"the strategies must match",
                    "Set save_strategy equal to eval_strategy."))
    if (best or lbme) and eval_s == "no":
        out.append(("HD601", Severity.WARNING,
                    f"metric_for_best_model={best!r}, load_best_model_at_end={lbme} but evaluation is off "
                    f"(eval_strategy='no'): no best checkpoint can be chosen",
                    'Set eval_strategy="steps" with eval_steps dividing save_steps, or drop metric_for_best_model.'))
    max_steps = args.get("max_steps")
    if eval_s == "steps" and eval_steps and isinstance(max_steps, (int, float)) and max_steps > 0 \
            and float(eval_steps) > max_steps:
        out.append(("HD601", Severity.WARNING,
                    f"eval_steps={eval_steps} is larger than max_steps={max_steps}: no evaluation runs before the end",
                    "Lower eval_steps below max_steps."))
    gib = args.get("greater_is_better")
    if best and gib is True and str(best).split("_")[-1] == "loss":
        out.append(("HD601", Severity.CRITICAL,
                    f"metric_for_best_model={best!r} with greater_is_better=True: the checkpoint with the highest "
                    f"loss is kept as the best model",
                    "Set greater_is_better=False (or leave it unset: HF infers False for a metric ending in 'loss')."))
    if best and produced_metrics is not None:
        name = best_metric_name({"metric_for_best_model": best})
        produced = sorted(set(produced_metrics))
        if name not in produced:
            out.append(("HD601", Severity.CRITICAL,
                        f"metric_for_best_model={best!r} is not a metric the evaluation produces ({name!r} is not in "
                        f"{', '.join(produced)}): the Trainer raises KeyError at the first checkpoint after an "
                        f"evaluation",
                        f"Use metric_for_best_model='eval_loss' (or one of {', '.join(produced[:6])}), or pass a "
                        f"compute_metrics that returns {name!r}."))
    if at_startup:
        out.extend(_startup_advice(args, language, thresholds or Thresholds()))
    return out


def _startup_advice(args: dict, language: str | None, t: Thresholds) -> list[tuple[str, Severity, str, str]]:
    """Warnings given before a run starts (not applied by analyze, which judges the logged values)."""
    out = []
    if args.get("logging_nan_inf_filter", True):
        out.append(("HD601", Severity.WARNING,
                    "logging_nan_inf_filter=True (the HF default): a NaN/Inf step loss is replaced by the average of "
                    "the logging window, so the logged loss can look normal (or 0.0) while the weights are NaN",
                    "Set logging_nan_inf_filter=False so every non-finite step shows in the logs."))
    lr = args.get("learning_rate")
    arabic = str(language or "").strip().lower() in _ARABIC
    row = RECOMMENDED["arabic" if arabic else "default"]
    lo, hi = row["learning_rate"] if arabic else (t.lr_recommended_min, t.lr_recommended_max)
    ar = RECOMMENDED["arabic"]
    d = RECOMMENDED["default"]
    table = (f"seed 000's table: {d['learning_rate'][0]:g}..{d['learning_rate'][1]:g} for zero-shot voice cloning; {ar['learning_rate'][0]:g}..{ar['learning_rate'][1]:g} for Arabic, with "
             f"warmup_steps {ar['warmup_steps'][0]}..{ar['warmup_steps'][1]}")
    if isinstance(lr, (int, float)) and lr > 0 and not (lo <= lr <= hi):
        out.append(("HD601", Severity.WARNING,
                    f"learning_rate={lr:g} is outside the recommended range {lo:g}..{hi:g}"
                    f"{' for Arabic' if arabic else ''} ({table}): far higher rates destabilise the audio codebook "
                    f"heads, far lower ones barely move a LoRA adapter",
                    "Start from learning_rate=5e-5 (1e-5..3e-5 for a new language such as Arabic, which differs from "
                    "the pre-training data) and adjust from the audio loss curve; see higgs_diag.trainer.presets."))
    if arabic:
        w = args.get("warmup_steps") or 0
        wlo, whi = ar["warmup_steps"]
        if isinstance(w, (int, float)) and not (wlo <= w <= whi) and not args.get("warmup_ratio"):
            out.append(("HD601", Severity.WARNING,
                        f"warmup_steps={w} for an Arabic run: seed 000 recommends {wlo}..{whi} for stable convergence "
                        f"on a language far from the pre-training data",
                        f"Use warmup_steps={wlo}..{whi} (and eval_steps dividing save_steps, a larger validation set "
                        f"for a stable eval_loss)."))
    return out


@check("HD601", "config-mismatch", rank=25)
def config_mismatch(run, t):
    """The TrainingArguments contradict themselves or the run.

    What it detects: `load_best_model_at_end=True` with `save_steps` not a multiple of `eval_steps` or
    with different save and eval strategies; a best-model metric while evaluation is off; `eval_steps`
    beyond `max_steps`; `greater_is_better=True` with a loss as the best-model metric (the worst
    checkpoint is kept); `logging_nan_inf_filter=True` while the run produced NaN/Inf, so that the logged
    loss hides it. (`higgs_diag.trainer` runs the same validation before training starts.)

    Why it happens: defaults copied between scripts (e.g. `save_steps=7000, eval_steps=5000`), and
    HF's `logging_nan_inf_filter` (on by default) that replaces a NaN/Inf step loss by the average of
    the logging window: the loss curve looks normal, or 0.0, while the weights are already NaN.

    Example: `logging_nan_inf_filter=True; grad_norm NaN at 37 steps from step 12, logged loss 0.0`.

    Fix: `save_steps` a multiple of `eval_steps` (seed 000: eval_steps 500, save_steps 500-1000);
    `greater_is_better=False` for a loss; `logging_nan_inf_filter=False` while debugging numerics.
    """
    if not run.args:
        return
    for code, sev, msg, fix in validate_args(run.args):
        yield finding(sev, msg.split(":")[0], evidence=[f"{msg} (args from {run.args_file})"],
                      explanation=msg, fix=fix)
    if run.args.get("logging_nan_inf_filter", True):
        g = run.series("grad_norm")
        gv = g.to_numpy(dtype="float64")
        bad = ~np.isfinite(gv)
        loss = run.series("loss")
        lv = loss.to_numpy(dtype="float64")
        if bad.sum() >= 2 and np.isfinite(lv).all() and len(lv):
            steps = g.index[bad]
            yield finding(
                Severity.WARNING, "logging_nan_inf_filter=True hides non-finite losses from the logged loss",
                evidence=[f"grad_norm non-finite at {int(bad.sum())} steps ({steps[0]}-{steps[-1]}) while every "
                          f"logged loss is finite",
                          f"logging_nan_inf_filter={run.args.get('logging_nan_inf_filter', True)!r} "
                          f"(args from {run.args_file})"],
                explanation="With logging_nan_inf_filter=True the Trainer replaces a NaN/Inf step loss by the average "
                            "of the current logging window (0.0 when the whole window is NaN), so the logged loss "
                            "looks finite while the gradients and soon the weights are not.",
                fix="Set logging_nan_inf_filter=False while you debug, so NaN shows in the logged loss.",
                steps=(int(steps[0]), int(steps[-1])), metrics=("loss", "grad_norm"))
