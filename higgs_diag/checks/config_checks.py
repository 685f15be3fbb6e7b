"""Configuration contradictions in the TrainingArguments: one rule per contradiction (HD601-HD610).

Each contradiction is one *condition* function, ``args dict -> ArgsIssue | None``, written once and used
twice: by analyze's rule on the logged `args` and by :func:`validate_args`, which the bundled trainer
(``higgs_diag.trainer.validation``) runs on its TrainingArguments before training starts. The rules of
scope ``startup`` (HD606, HD608-HD610) need what only the trainer knows before a run (the metrics its
evaluation will produce, the language) or are advice that analyze replaces by judging the logged values
(the learning rate: HD508; the NaN filter: HD607, which looks for the NaN it actually hid).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ..config import Thresholds
from ..diagnosis import Finding, Severity
from ..hf_args import best_metric_name
from . import REGISTRY, check, finding

# Seed 000's hyperparameter table (Higgs Audio v2 zero-shot voice cloning, 800 h, 8 GPUs) and its Arabic
# variant: the ranges the trainer's start-up advice compares against. higgs_diag.trainer.presets builds its
# TrainingArguments overrides from the same numbers.
RECOMMENDED = {
    "default": {"learning_rate": (5e-5, 1e-4), "warmup_steps": (100, 500), "per_device_train_batch_size": (2, 4)},
    "arabic": {"learning_rate": (1e-5, 3e-5), "warmup_steps": (500, 1000), "per_device_train_batch_size": (2, 4)},
}
_ARABIC = {"ar", "ara", "arabic"}


def _strategy(args: dict, name: str) -> str:
    v = args.get(name)
    if v is None and name == "eval_strategy":
        v = args.get("evaluation_strategy")
    return str(v or "no").split(".")[-1].lower()  # "IntervalStrategy.STEPS" -> "steps"


def _eval_steps(args: dict):
    """``eval_steps``, which the Trainer takes from ``logging_steps`` when unset."""
    v = args.get("eval_steps")
    return args.get("logging_steps") if v is None else v


def _is_arabic(language: str | None) -> bool:
    return str(language or "").strip().lower() in _ARABIC


# ---- the conditions: one per rule, shared by analyze and the trainer ----------------------------------------

@dataclass(frozen=True)
class ArgsIssue:
    """One contradiction found in TrainingArguments: its rule's code, severity and title, the evidence and
    the evidence-specific part of the fix (appended to the rule's Fix)."""

    code: str
    severity: Severity
    title: str
    evidence: tuple[str, ...] = ()
    fix_detail: str = ""

    @property
    def fix(self) -> str:
        """The rule's Fix (its docstring) with this issue's detail."""
        return f"{REGISTRY[self.code].fix} {self.fix_detail}".strip()


def save_steps_issue(args: dict) -> ArgsIssue | None:
    """HD601: ``load_best_model_at_end`` with ``save_steps`` not a multiple of ``eval_steps``."""
    eval_steps, save_steps = _eval_steps(args), args.get("save_steps")
    if not (args.get("load_best_model_at_end") and _strategy(args, "eval_strategy") == "steps"
            and _strategy(args, "save_strategy") == "steps" and eval_steps and save_steps):
        return None
    try:
        es, ss = float(eval_steps), float(save_steps)
    except (TypeError, ValueError):
        return None
    if es <= 0 or (ss / es) == int(ss / es):
        return None
    return ArgsIssue("HD601", Severity.CRITICAL,
                     f"load_best_model_at_end=True with save_steps={save_steps} not a multiple of eval_steps={eval_steps}",
                     (f"eval_strategy='steps', eval_steps={eval_steps}; save_strategy='steps', save_steps={save_steps}",),
                     f"Here: eval_steps={eval_steps}, save_steps={int(max(es, round(ss / es) * es))}.")


def strategy_issue(args: dict) -> ArgsIssue | None:
    """HD602: ``load_best_model_at_end`` with different eval and save strategies."""
    eval_s, save_s = _strategy(args, "eval_strategy"), _strategy(args, "save_strategy")
    if not args.get("load_best_model_at_end") or eval_s == save_s:
        return None
    return ArgsIssue("HD602", Severity.CRITICAL,
                     f"load_best_model_at_end=True with eval_strategy={eval_s!r} and save_strategy={save_s!r}",
                     (f"eval_strategy={eval_s!r}, save_strategy={save_s!r}",),
                     f"Here: save_strategy={eval_s!r}." if eval_s != "no" else "")


def eval_off_issue(args: dict) -> ArgsIssue | None:
    """HD603: a best-model metric (or ``load_best_model_at_end``) while evaluation is off."""
    best, lbme = args.get("metric_for_best_model"), bool(args.get("load_best_model_at_end"))
    if not (best or lbme) or _strategy(args, "eval_strategy") != "no":
        return None
    return ArgsIssue("HD603", Severity.WARNING,
                     f"metric_for_best_model={best!r}, load_best_model_at_end={lbme} but evaluation is off "
                     f"(eval_strategy='no')",
                     (f"eval_strategy={args.get('eval_strategy', args.get('evaluation_strategy'))!r}",))


def eval_steps_issue(args: dict) -> ArgsIssue | None:
    """HD604: ``eval_steps`` larger than ``max_steps``."""
    eval_steps, max_steps = _eval_steps(args), args.get("max_steps")
    if _strategy(args, "eval_strategy") != "steps" or not eval_steps or isinstance(max_steps, bool) \
            or not isinstance(max_steps, (int, float)) or max_steps <= 0:
        return None
    try:
        if float(eval_steps) <= max_steps:
            return None
    except (TypeError, ValueError):
        return None
    return ArgsIssue("HD604", Severity.WARNING,
                     f"eval_steps={eval_steps} is larger than max_steps={max_steps}: no evaluation runs before the end",
                     (f"eval_strategy='steps', eval_steps={eval_steps}"
                      + (" (from logging_steps)" if args.get("eval_steps") is None else "") + f", max_steps={max_steps}",),
                     f"Here, e.g. eval_steps={max(1, int(max_steps) // 10)}.")


def greater_is_better_issue(args: dict) -> ArgsIssue | None:
    """HD605: ``greater_is_better=True`` for a loss as the best-model metric."""
    best = args.get("metric_for_best_model")
    if not best or args.get("greater_is_better") is not True or str(best).split("_")[-1] != "loss":
        return None
    return ArgsIssue("HD605", Severity.CRITICAL,
                     f"metric_for_best_model={best!r} with greater_is_better=True: the checkpoint with the highest "
                     f"loss is kept as the best model",
                     (f"metric_for_best_model={best!r}, greater_is_better=True, "
                      f"load_best_model_at_end={args.get('load_best_model_at_end')!r}",))


def produced_metric_issue(args: dict, produced_metrics: Iterable[str]) -> ArgsIssue | None:
    """HD606: the best-model metric is not one the evaluation will produce."""
    best = args.get("metric_for_best_model")
    if not best:
        return None
    name = best_metric_name({"metric_for_best_model": best})
    produced = sorted(set(produced_metrics))
    if name in produced:
        return None
    return ArgsIssue("HD606", Severity.CRITICAL,
                     f"metric_for_best_model={best!r} is not a metric the evaluation produces",
                     (f"{name!r} is not in {', '.join(produced) or 'nothing'}",),
                     f"Here the evaluation produces {', '.join(produced[:6]) or 'nothing'}; "
                     f"or return {name!r} from compute_metrics.")


def nan_filter_enabled(args: dict) -> bool:
    """``logging_nan_inf_filter``, on unless set to False (the HF default is True)."""
    return bool(args.get("logging_nan_inf_filter", True))


def nan_filter_issue(args: dict) -> ArgsIssue | None:
    """HD608 (start-up): the NaN/Inf filter of the logged loss is on."""
    if not nan_filter_enabled(args):
        return None
    return ArgsIssue("HD608", Severity.WARNING,
                     "logging_nan_inf_filter=True (the HF default) hides NaN/Inf step losses in the logged loss",
                     (f"logging_nan_inf_filter={args.get('logging_nan_inf_filter', True)!r}",))


def lr_range_issue(args: dict, language: str | None, t: Thresholds) -> ArgsIssue | None:
    """HD609 (start-up): learning rate outside seed 000's range (its Arabic row for an Arabic run)."""
    lr = args.get("learning_rate")
    arabic = _is_arabic(language)
    lo, hi = RECOMMENDED["arabic"]["learning_rate"] if arabic else (t.lr_recommended_min, t.lr_recommended_max)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0 or lo <= lr <= hi:
        return None
    d, ar = RECOMMENDED["default"], RECOMMENDED["arabic"]
    return ArgsIssue("HD609", Severity.WARNING,
                     f"learning_rate={lr:g} is outside the recommended range {lo:g}..{hi:g}{' for Arabic' if arabic else ''}",
                     (f"seed 000's table: {d['learning_rate'][0]:g}..{d['learning_rate'][1]:g} for zero-shot voice "
                      f"cloning; {ar['learning_rate'][0]:g}..{ar['learning_rate'][1]:g} for Arabic, with warmup_steps "
                      f"{ar['warmup_steps'][0]}..{ar['warmup_steps'][1]}",))


def arabic_warmup_issue(args: dict, language: str | None) -> ArgsIssue | None:
    """HD610 (start-up): an Arabic run's warmup outside seed 000's Arabic range."""
    if not _is_arabic(language) or args.get("warmup_ratio"):
        return None
    w = args.get("warmup_steps") or 0
    wlo, whi = RECOMMENDED["arabic"]["warmup_steps"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or wlo <= w <= whi:
        return None
    return ArgsIssue("HD610", Severity.WARNING,
                     f"warmup_steps={w} for an Arabic run: seed 000 recommends {wlo}..{whi}",
                     (f"warmup_steps={w}, warmup_ratio={args.get('warmup_ratio')!r}, language={language!r}",))


# the conditions analyze also judges on logged args, in report order
LOGGED_CONDITIONS = (save_steps_issue, strategy_issue, eval_off_issue, eval_steps_issue, greater_is_better_issue)


def args_issues(args: dict, *, at_startup: bool = False, produced_metrics: Iterable[str] | None = None,
                language: str | None = None, thresholds: Thresholds | None = None) -> list[ArgsIssue]:
    """Every condition that holds for ``args`` (see :func:`validate_args`)."""
    t = thresholds or Thresholds()
    found = [cond(args) for cond in LOGGED_CONDITIONS]
    if produced_metrics is not None:
        found.append(produced_metric_issue(args, produced_metrics))
    if at_startup:
        found += [nan_filter_issue(args), lr_range_issue(args, language, t), arabic_warmup_issue(args, language)]
    return [i for i in found if i is not None]


def validate_args(args: dict, *, at_startup: bool = False, produced_metrics: Iterable[str] | None = None,
                  language: str | None = None, thresholds: Thresholds | None = None
                  ) -> list[tuple[str, Severity, str, str]]:
    """Contradictions in TrainingArguments given as a dict (``args.to_dict()`` or the logged JSON), as
    ``(code, severity, title, fix)`` tuples; the fix is the rule's Fix with the evidence-specific detail.

    Always HD601-HD605 (the rules analyze applies to logged args). ``produced_metrics`` (the metric names
    evaluation will produce, e.g. ``{"eval_loss", ...}``): HD606. ``at_startup=True`` adds the advice given
    before a run: HD608 (NaN filter), HD609 (learning rate; ``language="ar"`` uses seed 000's Arabic row),
    HD610 (Arabic warmup).
    """
    return [(i.code, i.severity, i.title, i.fix)
            for i in args_issues(args, at_startup=at_startup, produced_metrics=produced_metrics,
                                 language=language, thresholds=thresholds)]


@dataclass(frozen=True)
class StartupArgs:
    """The subject of the ``startup`` rules: the TrainingArguments dict and what the trainer knows before a run."""

    args: dict
    produced_metrics: frozenset[str] | None = None
    language: str | None = None


def _from_logged(run, issue: ArgsIssue | None) -> Iterator[Finding]:
    if issue is not None:
        yield finding(issue.severity, issue.title, evidence=[*issue.evidence, f"args from {run.args_file}"],
                      fix_detail=issue.fix_detail)


def _from_startup(issue: ArgsIssue | None) -> Iterator[Finding]:
    if issue is not None:
        yield finding(issue.severity, issue.title, evidence=list(issue.evidence), fix_detail=issue.fix_detail)


# ---- analyze's rules on the logged args ----------------------------------------------------------------------

@check("HD601", "config-mismatch", rank=25)
def save_steps_not_multiple_of_eval_steps(run, t):
    """`load_best_model_at_end=True` with `save_steps` not a multiple of `eval_steps`.

    What it detects: `load_best_model_at_end=True`, both strategies `"steps"`, and a `save_steps` that
    `eval_steps` does not divide (`eval_steps` defaults to `logging_steps`). `higgs_diag.trainer` runs
    the same validation before training starts.

    Why it happens: defaults copied between scripts (e.g. `save_steps=7000, eval_steps=5000`), or
    `save_steps` changed after the TrainingArguments were built. TrainingArguments raises `ValueError`
    for this combination in `__post_init__`; set afterwards, a best checkpoint can only be kept at the
    steps where an evaluation and a save fall together, so most evaluations choose nothing.

    Example: `load_best_model_at_end=True with save_steps=7 not a multiple of eval_steps=5`.

    Fix: use a `save_steps` that is a multiple of `eval_steps` (seed 000: eval_steps 500, save_steps
    500-1000).
    """
    if run.args:
        yield from _from_logged(run, save_steps_issue(run.args))


@check("HD602", "config-mismatch", rank=25)
def best_model_strategies_differ(run, t):
    """`load_best_model_at_end=True` with different evaluation and save strategies.

    What it detects: `load_best_model_at_end=True` while `eval_strategy` and `save_strategy` differ
    (e.g. evaluation per epoch, saves every N steps).

    Why it happens: the best checkpoint is chosen when a checkpoint is saved right after an
    evaluation; with different strategies the two rarely or never coincide. TrainingArguments raises
    `ValueError` ("requires the save and eval strategy to match") unless the strategy is changed after
    construction, or one of them comes from a config copied from another run.

    Example: `load_best_model_at_end=True with eval_strategy='epoch' and save_strategy='steps'`.

    Fix: set `save_strategy` equal to `eval_strategy` (and `save_steps` a multiple of `eval_steps`).
    """
    if run.args:
        yield from _from_logged(run, strategy_issue(run.args))


@check("HD603", "config-mismatch", rank=26)
def best_metric_without_evaluation(run, t):
    """A best-model metric is configured while evaluation is off.

    What it detects: `metric_for_best_model` set or `load_best_model_at_end=True` with
    `eval_strategy="no"` (the default).

    Why it happens: `eval_strategy` was left at its default while the best-model settings were copied
    from a run that evaluated, or `eval_dataset` was dropped and evaluation switched off with it. With
    no evaluation there is no metric, so no best checkpoint can be chosen and `load_best_model_at_end`
    has nothing to restore.

    Example: `metric_for_best_model='eval_loss', load_best_model_at_end=True but evaluation is off
    (eval_strategy='no')`.

    Fix: set `eval_strategy="steps"` with `eval_steps` dividing `save_steps` (and pass an
    `eval_dataset`), or drop `metric_for_best_model` and `load_best_model_at_end`.
    """
    if run.args:
        yield from _from_logged(run, eval_off_issue(run.args))


@check("HD604", "config-mismatch", rank=26)
def eval_steps_beyond_max_steps(run, t):
    """`eval_steps` is larger than `max_steps`: the run never evaluates.

    What it detects: `eval_strategy="steps"` with `eval_steps` (or, when unset, `logging_steps`)
    above `max_steps`.

    Why it happens: `eval_steps` copied from a longer run, or `max_steps` lowered for a short test
    without lowering `eval_steps`. The Trainer evaluates every `eval_steps` optimizer steps, so a run
    shorter than that ends before its first evaluation: no eval loss, no best checkpoint.

    Example: `eval_steps=500 is larger than max_steps=200: no evaluation runs before the end`.

    Fix: lower `eval_steps` below `max_steps` (e.g. a tenth of the run).
    """
    if run.args:
        yield from _from_logged(run, eval_steps_issue(run.args))


@check("HD605", "config-mismatch", rank=24)
def greater_is_better_for_a_loss(run, t):
    """`greater_is_better=True` with a loss as the best-model metric: the worst checkpoint is kept.

    What it detects: `metric_for_best_model` ending in `loss` (`eval_loss`, `audio_loss`, ...) with
    `greater_is_better=True`.

    Why it happens: `greater_is_better` copied from a run that selected by accuracy or BLEU. The Trainer
    keeps the checkpoint whose metric is the greatest, so with a loss it keeps the checkpoint with the
    highest loss, and `load_best_model_at_end` restores it.

    Example: `metric_for_best_model='eval_loss' with greater_is_better=True`.

    Fix: set `greater_is_better=False`, or leave it unset: HF infers `False` for a metric whose name
    ends in `loss`.
    """
    if run.args:
        yield from _from_logged(run, greater_is_better_issue(run.args))


@check("HD607", "nan-filter", rank=25)
def nan_filter_hid_non_finite(run, t):
    """`logging_nan_inf_filter=True` hid non-finite losses: the logged loss is finite, the gradients were not.

    What it detects: `logging_nan_inf_filter` on (the HF default) while `grad_norm` is NaN/Inf at two or
    more logged steps and every logged loss is finite.

    Why it happens: with `logging_nan_inf_filter=True` the Trainer replaces a NaN/Inf step loss by the
    average of the current logging window (0.0 when the whole window is NaN), so the loss curve looks
    normal, or 0.0, while the gradients and soon the weights are already NaN.

    Example: `grad_norm non-finite at 37 steps (12-200) while every logged loss is finite;
    logging_nan_inf_filter=True`.

    Fix: set `logging_nan_inf_filter=False` while you debug numerics, so every non-finite step shows
    in the logged loss; then fix the NaN itself (see non-finite / nan-masked).
    """
    if not run.args or not nan_filter_enabled(run.args):
        return
    g = run.series("grad_norm")
    bad = ~np.isfinite(g.to_numpy(dtype="float64"))
    lv = run.series("loss").to_numpy(dtype="float64")
    if bad.sum() < 2 or not len(lv) or not np.isfinite(lv).all():
        return
    steps = g.index[bad]
    yield finding(
        Severity.WARNING, "logging_nan_inf_filter=True hides non-finite losses from the logged loss",
        evidence=[f"grad_norm non-finite at {int(bad.sum())} steps ({steps[0]}-{steps[-1]}) while every logged "
                  f"loss is finite",
                  f"logging_nan_inf_filter={run.args.get('logging_nan_inf_filter', True)!r} (args from {run.args_file})"],
        steps=(int(steps[0]), int(steps[-1])), metrics=("loss", "grad_norm"))


# ---- start-up rules: applied by higgs_diag.trainer to its TrainingArguments before a run ---------------------

@check("HD606", "best-metric-missing", rank=20, scope="startup")
def best_metric_not_produced(subject: StartupArgs, t):
    """The best-model metric is not one the evaluation will produce (checked before training starts).

    What it detects: before a run, `metric_for_best_model` (with `eval_` added) is not among the metric
    names the trainer's evaluation produces (`HiggsAudioTrainer`: `eval_loss`, `eval_audio_loss`, the
    per-codebook losses, and whatever `compute_metrics` returns). Analyze finds the same problem in a
    run's logs as best-metric-missing (HD102).

    Why it happens: a metric name copied from another task (`bleu`, `wer`) without the
    `compute_metrics` that returns it, or a typo. `_save_checkpoint` looks the metric up whenever a save
    follows an evaluation and raises `KeyError` at the first such checkpoint, after hours of training.

    Example: `metric_for_best_model='bleu' is not a metric the evaluation produces`.

    Fix: use `metric_for_best_model="eval_loss"` (or another produced metric), or pass a
    `compute_metrics` that returns the metric.
    """
    if subject.produced_metrics is not None:
        yield from _from_startup(produced_metric_issue(subject.args, subject.produced_metrics))


@check("HD608", "nan-filter", rank=60, scope="startup")
def nan_filter_default(subject: StartupArgs, t):
    """`logging_nan_inf_filter=True` (the HF default) will hide NaN/Inf losses (advice before a run).

    What it detects: before a run, `logging_nan_inf_filter` is not set to `False`. Analyze does not
    apply this rule: it reports the filter only when it actually hid a non-finite loss (HD607).

    Why it happens: it is the HF default. The Trainer replaces a NaN/Inf step loss by the average of
    the logging window, so the logged loss can look normal (or 0.0) while the weights are NaN.

    Example: `logging_nan_inf_filter=True (the HF default) hides NaN/Inf step losses in the logged loss`.

    Fix: set `logging_nan_inf_filter=False` so every non-finite step shows in the logs
    (`higgs_diag.trainer.presets` does).
    """
    yield from _from_startup(nan_filter_issue(subject.args))


@check("HD609", "lr-range", rank=60, scope="startup", thresholds=("lr_recommended_min", "lr_recommended_max"))
def lr_outside_recommended_range(subject: StartupArgs, t):
    """The configured learning rate is outside the range recommended for Higgs Audio fine-tuning (before a run).

    What it detects: before a run, `learning_rate` outside [`lr_recommended_min`,
    `lr_recommended_max`], or outside seed 000's Arabic row (1e-5..3e-5) when the trainer is given
    `language="ar"`. Analyze judges the rate the run actually used instead (HD508).

    Why it happens: rates copied from text-LLM recipes or from tiny test runs. Seed 000's table
    (Higgs Audio v2 zero-shot voice cloning, 800 h, 8 GPUs) used 5e-5..1e-4, and 1e-5..3e-5 with
    warmup_steps 500..1000 for Arabic; far higher rates destabilise the audio codebook heads, far lower
    ones barely move a LoRA adapter.

    Example: `learning_rate=0.0001 is outside the recommended range 1e-05..3e-05 for Arabic`.

    Fix: start from `learning_rate=5e-5` (1e-5..3e-5 for a new language such as Arabic, which differs
    from the pre-training data) and adjust from the audio loss curve; see `higgs_diag.trainer.presets`.
    """
    yield from _from_startup(lr_range_issue(subject.args, subject.language, t))


@check("HD610", "lr-schedule", rank=60, scope="startup")
def arabic_warmup_outside_range(subject: StartupArgs, t):
    """An Arabic run's warmup is outside seed 000's 500..1000 steps (advice before a run).

    What it detects: before a run given `language="ar"`, `warmup_steps` outside 500..1000 and no
    `warmup_ratio`.

    Why it happens: warmup copied from a run on a language close to the pre-training data. Arabic is
    far from it: seed 000 used a longer warmup (500-1000 steps) for stable convergence.

    Example: `warmup_steps=100 for an Arabic run: seed 000 recommends 500..1000`.

    Fix: use `warmup_steps` 500..1000 for an Arabic run (with `eval_steps` dividing `save_steps`, and a
    larger validation set for a stable `eval_loss`); `higgs_diag.trainer.presets.preset("arabic-voice-cloning")`
    has these values.
    """
    yield from _from_startup(arabic_warmup_issue(subject.args, subject.language))
