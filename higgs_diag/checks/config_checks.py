"""Configuration contradictions readable from the logged TrainingArguments and model config.

``validate_args`` is the one implementation: analyze runs it on the logged `args`, and the bundled
trainer runs it on its TrainingArguments before training starts.
"""
from __future__ import annotations

import numpy as np

from ..diagnosis import Severity
from . import causes, check, finding


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


def validate_args(args: dict) -> list[tuple[str, Severity, str, str]]:
    """Contradictions in TrainingArguments given as a dict (``args.to_dict()`` or the logged JSON).
    Returns (code, severity, message, fix) tuples; ``HD601`` is the check code for all of them."""
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
    return out


@check("HD601", "config-mismatch", rank=25)
def config_mismatch(run, t):
    """The TrainingArguments contradict themselves or the run.

    What it detects: `load_best_model_at_end=True` with `save_steps` not a multiple of `eval_steps` or
    with different save and eval strategies; a best-model metric while evaluation is off; `eval_steps`
    beyond `max_steps`; `logging_nan_inf_filter=True` while the run produced NaN/Inf, so that the logged
    loss hides it.

    Why it happens: defaults copied between scripts (e.g. `save_steps=7000, eval_steps=5000`), and
    HF's `logging_nan_inf_filter` (on by default) that replaces a NaN/Inf step loss by the average of
    the logging window: the loss curve looks normal, or 0.0, while the weights are already NaN.

    Example: `logging_nan_inf_filter=True; grad_norm NaN at 37 steps from step 12, logged loss 0.0`.

    Fix: `save_steps` a multiple of `eval_steps` (seed 000: eval_steps 500, save_steps 500-1000);
    `logging_nan_inf_filter=False` while debugging numerics.
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
