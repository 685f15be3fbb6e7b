"""``HiggsAudioTrainer``: ``transformers.Trainer`` (4.45-4.46) for boson_multimodal's ``HiggsAudioModel``.

What it changes, and why (FACTS.md §1-§2):

* ``compute_loss``: the model computes no loss; the trainer computes :func:`higgs_diag.losses.higgs_audio_loss`
  (shifted text CE over ``expanded_labels`` + mean of the shifted per-codebook audio CEs over
  ``label_audio_ids``, ignore -100). A wrapper that returns only ``{"loss": ...}`` has its loss used as is
  (component losses are then unavailable, said once in the log). A batch without any valid target raises.
* ``prediction_step`` always computes the loss, whatever ``label_names`` and the model class, so ``eval_loss``
  is always there; ``label_names`` is forced to ``["label_ids", "label_audio_ids"]``.
* Batches: a ``HiggsAudioBatchInput`` or any object with boson's field names becomes a plain dict (HF calls
  ``len()``/``get()``/``in`` on batches); the collator is guarded (samples copied before it writes into them);
  every batch is validated by :func:`higgs_diag.batch.validate_batch` before its forward (``strict`` raises
  :class:`higgs_diag.batch.BatchValidationError` naming the field, ``warn`` logs once per kind).
* Logging: ``text_loss``, ``audio_loss``, ``audio_loss_cb{k}``, ``n_text_targets``, ``n_audio_targets`` (per
  optimizer step) and ``n_batches_no_audio_targets`` join the Trainer's ``loss`` in every training log entry,
  token-weighted over the logging window, gradient accumulation and DDP ranks (one all-reduce per step);
  ``eval_text_loss``, ``eval_audio_loss``, ``eval_audio_loss_cb{k}`` and the eval counts join ``eval_loss``.
  A codebook or window without valid targets is left out (its count says 0), never logged as 0.0 or NaN.
* Start-up validation (:func:`higgs_diag.trainer.validate_training_args`), the audio-loss monitor
  (:class:`higgs_diag.trainer.AudioLossMonitor`), resume under torch >= 2.6, adapter files in every
  checkpoint of a PEFT model inside a wrapper.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..batch import BatchSpec, BatchValidationError, as_dict, validate_batch
from ..config import Thresholds
from ..losses import LossResult, higgs_audio_loss
from .collator import guard_collator as _guard_collator
from .monitor import AudioLossMonitor
from .resume import load_rng_state_safely
from .validation import find_higgs_model, find_peft_model, model_config, validate_training_args

logger = logging.getLogger("higgs_diag.trainer")

LABEL_NAMES = ("label_ids", "label_audio_ids")
BATCH_MODES = ("strict", "warn", "off")


# ---------------------------------------------------------------------------------------------------------
# token-weighted sums
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Tally:
    """The sums behind the token-weighted component losses (all additive, so they reduce over micro-batches,
    steps and ranks by summing): text CE sum / count, per-codebook CE sum / count, batches, batches without
    an audio target, batches whose loss came from the model itself (a wrapper), optimizer steps."""

    n_cb: int
    text_sum: float = 0.0
    text_n: float = 0.0
    batches: float = 0.0
    no_audio: float = 0.0
    opaque: float = 0.0
    steps: float = 0.0
    cb_sum: list = field(default_factory=list)
    cb_n: list = field(default_factory=list)

    def __post_init__(self):
        self.cb_sum = self.cb_sum or [0.0] * self.n_cb
        self.cb_n = self.cb_n or [0.0] * self.n_cb

    def add_result(self, res: LossResult) -> None:
        self.batches += 1
        if res.text_loss is not None:
            self.text_sum += float(res.text_loss.detach()) * res.n_text_targets
            self.text_n += res.n_text_targets
        if res.n_audio_targets == 0:
            self.no_audio += 1
        counts = res.n_audio_targets_per_codebook
        if counts and any(counts):
            losses = res.codebook_losses.detach().double().cpu().tolist()
            self._grow(len(counts))
            for k, (n, v) in enumerate(zip(counts, losses)):
                if n > 0:
                    self.cb_sum[k] += v * n
                    self.cb_n[k] += n

    def add_opaque(self) -> None:
        self.batches += 1
        self.opaque += 1

    def _grow(self, n: int) -> None:
        if n > self.n_cb:
            self.cb_sum += [0.0] * (n - self.n_cb)
            self.cb_n += [0.0] * (n - self.n_cb)
            self.n_cb = n

    def __iadd__(self, other: "_Tally") -> "_Tally":
        self._grow(other.n_cb)
        for name in ("text_sum", "text_n", "batches", "no_audio", "opaque", "steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k in range(other.n_cb):
            self.cb_sum[k] += other.cb_sum[k]
            self.cb_n[k] += other.cb_n[k]
        return self

    def to_tensor(self, device) -> torch.Tensor:
        vals = [self.text_sum, self.text_n, self.batches, self.no_audio, self.opaque, self.steps,
                *self.cb_sum, *self.cb_n]
        return torch.tensor(vals, dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, n_cb: int) -> "_Tally":
        v = t.detach().cpu().tolist()
        return cls(n_cb, *v[:6], cb_sum=v[6:6 + n_cb], cb_n=v[6 + n_cb:6 + 2 * n_cb])

    # ---- views ---------------------------------------------------------------------------------------------
    def codebook_losses(self) -> list:
        return [s / n if n > 0 else None for s, n in zip(self.cb_sum, self.cb_n)]

    def audio_loss(self) -> float | None:
        present = [v for v in self.codebook_losses() if v is not None]
        return sum(present) / len(present) if present else None

    def text_loss(self) -> float | None:
        return self.text_sum / self.text_n if self.text_n > 0 else None

    def metrics(self, prefix: str = "", per_step: bool = False) -> dict[str, float]:
        """Log entries: losses only where there were targets; counts per optimizer step (training) or totals."""
        if self.batches == 0 or self.opaque == self.batches:
            return {}  # nothing computed here (no batch, or only a wrapper's own loss): nothing to report
        out: dict[str, float] = {}
        if self.text_loss() is not None:
            out[f"{prefix}text_loss"] = self.text_loss()
        if self.audio_loss() is not None:
            out[f"{prefix}audio_loss"] = self.audio_loss()
        for k, v in enumerate(self.codebook_losses()):
            if v is not None:
                out[f"{prefix}audio_loss_cb{k}"] = v
        div = self.steps if per_step and self.steps > 0 else 1.0
        out[f"{prefix}n_text_targets"] = self.text_n / div
        out[f"{prefix}n_audio_targets"] = sum(self.cb_n) / div
        out[f"{prefix}n_batches_no_audio_targets"] = self.no_audio
        return out


@dataclass(frozen=True)
class StepLosses:
    """One optimizer step's component losses (token-weighted over its micro-batches and all ranks)."""

    step: int
    text_loss: float | None
    audio_loss: float | None
    codebook_losses: tuple
    n_text_targets: int
    n_audio_targets: int
    batches_without_audio_targets: int

    def as_dict(self) -> dict[str, Any]:
        out = {"text_loss": self.text_loss, "audio_loss": self.audio_loss, "n_text_targets": self.n_text_targets,
               "n_audio_targets": self.n_audio_targets,
               "batches_without_audio_targets": self.batches_without_audio_targets}
        out.update({f"audio_loss_cb{k}": v for k, v in enumerate(self.codebook_losses)})
        return out


class _StepEnd(TrainerCallback):
    """Runs first at every optimizer step's end: reduces the step's sums so that the monitor and the log
    see the same numbers on every rank."""

    def __init__(self, trainer: "HiggsAudioTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._finish_step(state.global_step)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


# ---------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------
class HiggsAudioTrainer(Trainer):
    """``transformers.Trainer`` for Higgs Audio v2; takes every ``Trainer`` argument plus:

    ``batch_validation``: ``"strict"`` (default: a bad batch raises ``BatchValidationError`` naming the field),
    ``"warn"`` (log each kind of problem once, train on) or ``"off"``.
    ``startup_validation``: ``"strict"`` (default: a contradictory configuration raises
    ``StartupValidationError`` before any step), ``"warn"`` or ``"off"``.
    ``max_masked_share``: share of -100 audio labels above which a batch is flagged (warning, default 0.95).
    ``audio_monitor``: True (default: an :class:`AudioLossMonitor` with ``thresholds``), an
    ``AudioLossMonitor`` instance, or False.
    ``guard_collator``: copy samples before the collator writes into them (default True).
    ``language``: ``"ar"`` applies seed 000's Arabic advice at start-up.
    ``thresholds``: :class:`higgs_diag.config.Thresholds` for the monitor and the lr advice.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, *, batch_validation: str = "strict", startup_validation: str = "strict",
                 max_masked_share: float = 0.95, audio_monitor: bool | AudioLossMonitor = True,
                 guard_collator: bool = True, language: str | None = None, thresholds: Thresholds | None = None,
                 **kwargs):
        if batch_validation not in BATCH_MODES:
            raise ValueError(f"batch_validation must be one of {BATCH_MODES}, got {batch_validation!r}")
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        if args.label_names is not None and list(args.label_names) != list(LABEL_NAMES):
            logger.warning("label_names=%r replaced by %r: HiggsAudioModel's targets are label_ids and "
                           "label_audio_ids", args.label_names, list(LABEL_NAMES))
        args.label_names = list(LABEL_NAMES)
        if data_collator is not None and guard_collator:
            data_collator = _guard_collator(data_collator, to_dict=True)
        self.thresholds = thresholds or Thresholds()
        callbacks = list(kwargs.pop("callbacks", None) or [])
        monitors = [c for c in callbacks if isinstance(c, AudioLossMonitor)]
        if isinstance(audio_monitor, AudioLossMonitor):
            if audio_monitor not in monitors:
                callbacks.append(audio_monitor)
                monitors.append(audio_monitor)
        elif audio_monitor and not monitors:
            monitors.append(AudioLossMonitor(thresholds=self.thresholds))
            callbacks.append(monitors[-1])

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, **kwargs)

        self.batch_validation = batch_validation
        self.max_masked_share = max_masked_share
        self.monitors = [m.bind(self) for m in monitors]
        self.callback_handler.callbacks.insert(0, _StepEnd(self))
        cfg = model_config(self.model)
        self.batch_spec = BatchSpec.from_config(cfg)
        n_cb = self.batch_spec.num_codebooks or 0
        self._step_tally, self._window, self._eval_tally = _Tally(n_cb), _Tally(n_cb), _Tally(n_cb)
        self._in_eval = False
        self._warned: set[str] = set()
        self.batch_issue_counts: Counter = Counter()
        self.current_batch: dict | None = None
        self.last_step: StepLosses | None = None
        self.startup_problems = validate_training_args(
            self.args, self.model, self.data_collator, self.train_dataset, mode=startup_validation,
            produced_metrics=self.produced_eval_metrics(), language=language, thresholds=self.thresholds,
            max_masked_share=max_masked_share, label_names=self.label_names)

    # ---- what evaluation produces --------------------------------------------------------------------------
    def produced_eval_metrics(self) -> set[str] | None:
        """The eval metric names this trainer logs (None when a compute_metrics adds unknown ones)."""
        if self.compute_metrics is not None:
            return None
        names = ["eval"]
        if isinstance(self.eval_dataset, Mapping):
            names = [f"eval_{k}" for k in self.eval_dataset]
        n_cb = self.batch_spec.num_codebooks or 0
        base = ["loss", "text_loss", "audio_loss", "n_text_targets", "n_audio_targets", "n_batches_no_audio_targets",
                "runtime", "samples_per_second", "steps_per_second", *[f"audio_loss_cb{k}" for k in range(n_cb)]]
        return {f"{p}_{b}" for p in names for b in base}

    # ---- batches -------------------------------------------------------------------------------------------
    def _prepare_inputs(self, inputs):
        if not isinstance(inputs, Mapping):
            inputs = as_dict(inputs)
        if self.batch_validation != "off":
            self._check_batch(inputs)
        return super()._prepare_inputs(inputs)

    def _check_batch(self, batch: Mapping) -> None:
        issues = validate_batch(batch, self.batch_spec, max_masked_share=self.max_masked_share)
        if not issues:
            return
        phase = "evaluation" if self._in_eval else "training"
        step = self.state.global_step + (0 if self._in_eval else 1)
        critical = [i for i in issues if i.severity == "critical"]
        if self.batch_validation == "strict" and critical:
            raise BatchValidationError(critical, context=f"{phase} batch at step {step} is unusable (HiggsAudioTrainer "
                                                         f"batch_validation='strict')")
        for i in issues:
            self.batch_issue_counts[i.kind] += 1
            if i.kind not in self._warned:
                self._warned.add(i.kind)
                logger.warning("[higgs-diag batch] %s batch at step %d: %s (logged once per kind; counted in "
                               "trainer.batch_issue_counts)", phase, step, i)

    # ---- loss ----------------------------------------------------------------------------------------------
    def compute_dual_loss(self, outputs, batch: Mapping) -> LossResult:
        """The loss of one batch from the model outputs (override to compare variants, never to fix values)."""
        return higgs_audio_loss(outputs, batch.get("label_audio_ids"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        batch = inputs if isinstance(inputs, Mapping) else as_dict(inputs)
        outputs = model(**batch)
        get = outputs.get if isinstance(outputs, Mapping) else (lambda k: getattr(outputs, k, None))
        tally = self._eval_tally if self._in_eval else self._step_tally
        if get("logits") is not None or get("audio_logits") is not None:
            if get("logits") is not None and get("expanded_labels") is None:
                raise ValueError("the model output has `logits` but no `expanded_labels`: the text targets cannot be "
                                 "aligned with the logits (audio-in tokens change the sequence length). Return "
                                 "HiggsAudioModel's outputs unchanged from your wrapper.")
            res = self.compute_dual_loss(outputs, batch)
            if res.empty:
                raise ValueError(
                    "no valid target in this batch: every label_ids and label_audio_ids entry is -100 "
                    f"(n_text_targets=0, n_audio_targets=0), so there is no loss to compute; the trainer does not "
                    f"invent one. Fix the labels (batch fields: {', '.join(batch)}).")
            if res.n_audio_targets == 0 and "no-audio-targets" not in self._warned:
                self._warned.add("no-audio-targets")
                logger.warning("[higgs-diag batch] a %s batch has no valid audio target: its loss is the text loss "
                               "alone; such batches are counted in n_batches_no_audio_targets",
                               "evaluation" if self._in_eval else "training")
            tally.add_result(res)
            loss = res.loss
        elif get("loss") is not None:
            if "opaque-loss" not in self._warned:
                self._warned.add("opaque-loss")
                logger.warning("[higgs-diag] the model returns only `loss` (a wrapper hides logits/audio_logits): "
                               "its loss is used as is, text_loss/audio_loss cannot be logged and the shift cannot be "
                               "checked. Return HiggsAudioModel's outputs (or pass the HiggsAudioModel) to get them.")
            tally.add_opaque()
            loss = get("loss")
        else:
            keys = list(outputs.keys()) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ValueError(f"cannot compute a loss: the model output has neither logits/audio_logits "
                             f"(HiggsAudioModel outputs) nor a loss (got {keys})")
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs):
        return super().floating_point_ops(inputs if isinstance(inputs, Mapping) else as_dict(inputs))

    def training_step(self, model, inputs, *args, **kwargs):
        self.current_batch = inputs  # the monitor dumps it (CPU copy only when it does)
        return super().training_step(model, inputs, *args, **kwargs)

    # ---- per-step reduction and logging ---------------------------------------------------------------------
    def _reduce(self, tally: _Tally) -> _Tally:
        if not _distributed():
            return tally
        t = tally.to_tensor(self.args.device)
        torch.distributed.all_reduce(t)
        return _Tally.from_tensor(t, tally.n_cb)

    def _finish_step(self, step: int) -> None:
        t = self._reduce(self._step_tally)
        t.steps = 1
        self._window += t
        self._step_tally = _Tally(t.n_cb)
        cb = tuple(t.codebook_losses())
        self.last_step = StepLosses(step, t.text_loss(), t.audio_loss(), cb, int(t.text_n), int(sum(t.cb_n)),
                                    int(t.no_audio))

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):  # a training log entry
            logs.update(self._window.metrics(per_step=True))
            self._window = _Tally(self._window.n_cb)
            for m in self.monitors:
                logs.update(m.pop_log_metrics())
        super().log(logs, *args, **kwargs)

    # ---- evaluation ----------------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.mean().detach()
        if prediction_loss_only:
            return loss, None, None
        get = outputs.get if isinstance(outputs, Mapping) else (lambda k: getattr(outputs, k, None))
        logits = tuple(x.detach() for x in (get("logits"), get("audio_logits")) if x is not None) or None
        labels = None
        if get("expanded_labels") is not None:
            lab = inputs.get("label_audio_ids")
            # label_audio_ids [C, N] -> [N, C], so that batches concatenate along rows like audio_logits [N, C, V]
            labels = (get("expanded_labels").detach(), lab.t().detach() if lab is not None else None)
        return loss, logits, labels

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        self._eval_tally = _Tally(self.batch_spec.num_codebooks or 0)
        self._in_eval = True
        try:
            out = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                          ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._in_eval = False
        tally = self._reduce(self._eval_tally)
        if f"{metric_key_prefix}_loss" not in out.metrics:
            raise RuntimeError(f"{description}: no loss was computed ({int(tally.batches)} batches): the evaluation "
                               f"dataset produced no batch; HiggsAudioTrainer does not invent {metric_key_prefix}_loss")
        out.metrics.update(tally.metrics(prefix=f"{metric_key_prefix}_"))
        return out

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _load_rng_state(self, checkpoint):
        load_rng_state_safely(super()._load_rng_state, checkpoint)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        peft_model = find_peft_model(self.model)
        if peft_model is not None and peft_model is not self.model:  # a PEFT model inside a wrapper
            peft_model.save_pretrained(output_dir or self.args.output_dir,
                                       safe_serialization=self.args.save_safetensors)


__all__ = ["HiggsAudioTrainer", "LABEL_NAMES", "StepLosses", "find_higgs_model"]
