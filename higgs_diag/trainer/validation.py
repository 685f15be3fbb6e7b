"""Start-up validation: the configuration checks run before the first step.

:func:`validate_training_args` runs :func:`higgs_diag.checks.config_checks.validate_args` (the conditions
``higgs-diag analyze`` applies to logged args, HD601-HD605, and the start-up rules HD606, HD608-HD610; each
problem's message starts with its code, for ``higgs-diag explain``) on ``args.to_dict()`` and adds what only a live
run can check: the collator against ``model.config`` (delay pattern, codebook count, stream and audio token
ids), ``remove_unused_columns`` against the dataset's sample type, and one probe batch, collated from the
first training samples and checked by :func:`higgs_diag.batch.validate_batch` (the per-step batch validation).
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..batch import BatchSpec, validate_batch
from ..checks.config_checks import validate_args
from ..config import Thresholds
from .collator import guard_collator, unwrap_collator

logger = logging.getLogger("higgs_diag.trainer")

MODES = ("strict", "warn", "off")


@dataclass(frozen=True)
class Problem:
    severity: str  # "critical" or "warning"
    message: str
    fix: str = ""
    source: str = "args"  # args | model | collator | data

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}" + (f"\n    fix: {self.fix}" if self.fix else "")


class StartupValidationError(ValueError):
    """Raised by ``validate_training_args(mode="strict")`` (and so by ``HiggsAudioTrainer(...)``) when a
    critical problem is found; ``problems`` lists them."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"HiggsAudioTrainer start-up validation found {len(problems)} problem(s) that would make "
                         f"this run train the wrong thing or crash later:\n{lines}\n(pass startup_validation='warn' "
                         f"to log them and train anyway)")


# ---- model helpers -----------------------------------------------------------------------------------------
def find_higgs_model(model: Any) -> Any:
    """The HiggsAudioModel inside ``model`` (itself, a PEFT model's base, or a wrapper's submodule), or None."""
    if model is None:
        return None
    modules = model.modules() if hasattr(model, "modules") else [model]
    for m in modules:
        if type(m).__name__ == "HiggsAudioModel":
            return m
    return None


def find_peft_model(model: Any) -> Any:
    """The first PEFT model inside ``model`` (or ``model`` itself), or None."""
    if model is None or not hasattr(model, "modules"):
        return None
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return None
    for m in model.modules():
        if isinstance(m, PeftModel):
            return m
    return None


def model_config(model: Any) -> Any:
    inner = find_higgs_model(model)
    return getattr(inner if inner is not None else model, "config", None)


def signature_columns(model: Any, label_names: Iterable[str] = ()) -> list[str] | None:
    """The sample keys HF's ``remove_unused_columns`` keeps (``Trainer._set_signature_columns_if_needed``)."""
    if model is None:
        return None
    target = model
    if hasattr(model, "get_base_model") and type(model).__name__.startswith("Peft"):
        target = model.get_base_model()
    try:
        params = inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return None
    return list(params) + list({"label", "label_ids", *label_names})


def _collator_setting(collator: Any, name: str) -> Any:
    c = unwrap_collator(collator)
    if isinstance(c, functools.partial):
        return c.keywords.get(name)
    return getattr(c, name, None)


# ---- the checks --------------------------------------------------------------------------------------------
def _collator_problems(collator: Any, cfg: Any) -> list[Problem]:
    if collator is None or cfg is None:
        return []
    out = []
    pairs = [
        ("use_delay_pattern", "use_delay_pattern",
         "labels and inputs get the wrong layout: the model predicts codebook k one frame later than the data"),
        ("audio_num_codebooks", "audio_num_codebooks",
         "the batch's audio_out_ids / label_audio_ids rows do not match the model's codebook heads"),
        ("audio_stream_bos_id", "audio_stream_bos_id", "segments start with a token the model does not know as BOS"),
        ("audio_stream_eos_id", "audio_stream_eos_id", "segments end with a token the model does not know as EOS"),
        ("audio_out_token_id", "audio_out_token_idx", "audio-out segments are not placed at <|AUDIO_OUT|>"),
        ("audio_in_token_id", "audio_in_token_idx", "audio-in segments are not placed at <|AUDIO_IN|>"),
    ]
    for cname, mname, why in pairs:
        cv, mv = _collator_setting(collator, cname), getattr(cfg, mname, None)
        if cv is None or mv is None or cv == mv:
            continue
        out.append(Problem("critical", f"collator {cname}={cv!r} but model.config.{mname}={mv!r}: {why}",
                           f"Build the collator with {cname}=model.config.{mname} ({mv!r}).", "collator"))
    return out


def _remove_columns_problems(args: Any, train_dataset: Any, columns: list[str] | None) -> list[Problem]:
    if not getattr(args, "remove_unused_columns", False) or train_dataset is None or columns is None:
        return []
    keys = None
    names = getattr(train_dataset, "column_names", None)  # a datasets.Dataset: HF drops its columns
    if isinstance(names, (list, tuple)):
        keys = list(names)
    elif hasattr(train_dataset, "__getitem__") and hasattr(train_dataset, "__len__") and len(train_dataset):
        try:
            sample = train_dataset[0]
        except Exception:
            return []
        if isinstance(sample, Mapping):  # HF's RemoveColumnsCollator only filters dict samples
            keys = list(sample)
    if not keys:
        return []
    dropped = [k for k in keys if k not in columns]
    if not dropped:
        return []
    return [Problem("critical",
                    f"remove_unused_columns=True drops the sample keys {dropped} before the collator sees them "
                    f"(the model's forward takes no argument of that name): audio codes or labels never reach the batch",
                    "Set remove_unused_columns=False in TrainingArguments (batches of boson ChatMLDatasetSample objects "
                    "are not filtered, dict samples are).", "data")]


def _probe_problems(args: Any, collator: Any, dataset: Any, spec: BatchSpec, max_masked_share: float) -> list[Problem]:
    if collator is None or dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) \
            or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        return []
    try:
        n = min(len(dataset), max(1, int(getattr(args, "per_device_train_batch_size", 2) or 2)), 8)
    except TypeError:
        return []
    if n == 0:
        return []
    try:
        batch = guard_collator(collator, to_dict=True)([dataset[i] for i in range(n)])
    except Exception as e:
        return [Problem("critical", f"collating the first {n} training samples failed: {type(e).__name__}: {e}",
                        "Fix the dataset/collator pair before training.", "data")]
    return [Problem(i.severity, f"first training batch ({n} samples): {i}",
                    "See `higgs-diag explain` for the matching finding; the trainer validates every batch the same way.",
                    "data")
            for i in validate_batch(batch, spec, max_masked_share=max_masked_share)]


def validate_training_args(args: Any, model: Any = None, data_collator: Any = None, train_dataset: Any = None, *,
                           mode: str = "strict", produced_metrics: Iterable[str] | None = None,
                           language: str | None = None, thresholds: Thresholds | None = None,
                           max_masked_share: float = 0.95, probe_batch: bool = True,
                           label_names: Iterable[str] = ("label_ids", "label_audio_ids")) -> list[Problem]:
    """Check a run's configuration before it starts; returns the problems found.

    ``args``: TrainingArguments (or its ``to_dict()``). ``model``, ``data_collator``, ``train_dataset``
    optional: each enables its checks. ``produced_metrics``: the eval metric names the trainer will produce
    (the best-model metric must be one). ``language="ar"`` applies seed 000's Arabic advice.
    ``mode``: ``strict`` raises :class:`StartupValidationError` on a critical problem (warnings are logged),
    ``warn`` logs everything, ``off`` does nothing.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return []
    d = args.to_dict() if hasattr(args, "to_dict") else dict(args)
    problems = [Problem(str(sev), f"{code} {title}", fix, "args")
                for code, sev, title, fix in validate_args(d, at_startup=True, produced_metrics=produced_metrics,
                                                           language=language, thresholds=thresholds)]
    cfg = model_config(model)
    problems += _collator_problems(data_collator, cfg)
    problems += _remove_columns_problems(args, train_dataset, signature_columns(model, label_names))
    if probe_batch:
        problems += _probe_problems(args, data_collator, train_dataset, BatchSpec.from_config(cfg), max_masked_share)
    critical = [p for p in problems if p.severity == "critical"]
    for p in problems:
        if p.severity != "critical" or mode == "warn":
            (logger.error if p.severity == "critical" else logger.warning)("[higgs-diag start-up] %s", p)
    if critical and mode == "strict":
        raise StartupValidationError(critical)
    return problems
