"""The audio-loss monitor of seed 004, as a ``TrainerCallback``.

A next-token cross-entropy over the audio codebooks starts near ln(codebook_size + 2) and does not approach 0
on real speech; when it does, the model is solving a trivial task (most often the unshifted loss: it copies
its input, FACTS.md §1). The monitor watches the audio loss of every optimizer step (token-weighted over the
gradient-accumulation micro-batches and the DDP ranks, as computed by :class:`HiggsAudioTrainer`) with the
one collapse rule, :mod:`higgs_diag.collapse`, that HD201 applies to the logs afterwards:

* ``warning``   when it falls below ``warning`` (``Thresholds.audio_loss_warning``, 0.01),
* ``critical``  when it falls below ``critical`` (``Thresholds.audio_loss_critical``, 0.005),
* ``sustained`` when an episode below ``warning`` has lasted ``window`` steps
  (``Thresholds.audio_sustained_window``, 100),
* ``recovery``  when it has come back to ``warning`` or above and stayed there for ``recovery_steps``
  (``Thresholds.audio_recovery_steps``, 10) consecutive steps; shorter excursions do not end the episode, so a loss hovering at the
  threshold gives one warning, not one per step.

Alerts go to the log (``higgs_diag.trainer``) and into the logged metrics: every training log entry carries
``audio_alert_level`` (the worst level since the previous entry: 0 ok, 1 warning, 2 critical,
3 sustained; inside an episode the level is the episode's worst) and, when the loss recovered in that window, ``audio_alert_recovered`` = 1. On the first
critical alert, process 0 saves the batch that produced it with the step's losses
(``output_dir/higgs-diag/batches/step-NNNNNN.pt``, :func:`higgs_diag.batch.save_batch`) for
``higgs-diag replay-batch``; ``stop_on_critical=True`` then also saves a checkpoint and stops training.
The numbers are identical on every rank (they are all-reduced first), so every rank takes the same decision.

The trainer binds the monitor (it needs the step's losses and batch): add it through
``HiggsAudioTrainer(..., audio_monitor=AudioLossMonitor(...))`` or ``callbacks=[AudioLossMonitor(...)]``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

from ..batch import save_batch
from ..collapse import LEVEL_NAMES, CollapseTracker, classes_of, scaled_level
from ..config import Thresholds

logger = logging.getLogger("higgs_diag.trainer")

LEVELS = {name: level for level, name in LEVEL_NAMES.items()}


@dataclass(frozen=True)
class Alert:
    kind: str  # warning | critical | sustained | recovery
    step: int
    value: float
    threshold: float
    message: str
    dump: str | None = None  # the batch file written for this alert


@dataclass
class _State:
    window_level: int = 0  # worst level since the last log entry
    window_recovered: bool = False
    dumped: bool = False
    history: list[Alert] = field(default_factory=list)


class AudioLossMonitor(TrainerCallback):
    """See the module docstring. Thresholds default to ``Thresholds()`` (or the ``thresholds`` given).
    The rule itself is :class:`higgs_diag.collapse.CollapseTracker`, the one HD201 applies to the logs."""

    def __init__(self, warning: float | None = None, critical: float | None = None, window: int | None = None, *,
                 thresholds: Thresholds | None = None, stop_on_critical: bool = False, save_batch: bool = True,
                 dump_dir: str | None = None, recovery_steps: int | None = None):
        t = thresholds or Thresholds()
        self._levels_given = warning is not None or critical is not None  # explicit levels are taken as given
        self.tracker = CollapseTracker(
            float(t.audio_loss_warning if warning is None else warning),
            float(t.audio_loss_critical if critical is None else critical),
            int(t.audio_sustained_window if window is None else window),
            int(t.audio_recovery_steps if recovery_steps is None else recovery_steps))
        self.warning, self.critical = self.tracker.warning, self.tracker.critical
        self.window, self.recovery_steps = self.tracker.window, self.tracker.recovery_steps
        self.stop_on_critical = stop_on_critical
        self.save_batch = save_batch
        self.dump_dir = dump_dir
        self.trainer = None
        self._s = _State()

    # ---- public state --------------------------------------------------------------------------------------
    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, recoveries included, in order."""
        return list(self._s.history)

    @property
    def recoveries(self) -> list[Alert]:
        return [a for a in self._s.history if a.kind == "recovery"]

    @property
    def dump_path(self) -> str | None:
        return next((a.dump for a in self._s.history if a.dump), None)

    @property
    def level(self) -> int:
        """The collapse level after the last step fed (0 ok, 1 warning, 2 critical, 3 sustained)."""
        return self.tracker.level

    def bind(self, trainer) -> "AudioLossMonitor":
        """Bind to the trainer; the seed's levels are scaled to the model's codebook geometry (the same rule as
        HD201: a fraction of ln(codebook_size + 2), unchanged for the release's 1026 classes)."""
        self.trainer = trainer
        model = getattr(trainer, "model", None)
        classes = classes_of(getattr(model, "config", None))  # a PeftModel forwards .config to its base
        if classes is not None and not self._levels_given:
            self.tracker.warning = self.warning = scaled_level(self.warning, classes)
            self.tracker.critical = self.critical = scaled_level(self.critical, classes)
        return self

    # ---- the rule ------------------------------------------------------------------------------------------
    def update(self, step: int, audio_loss: float | None) -> list[Alert]:
        """Feed one step's audio loss; returns the alerts it raises (also kept in :attr:`alerts`). ``None``
        (no audio target this step: the trainer counts those), exact zeros and non-finite values are skipped."""
        events = self.tracker.update(step, audio_loss)
        new = [Alert(e.kind, e.step, e.value, e.threshold, self._message(e, step)) for e in events]
        if any(e.kind == "recovery" for e in events):
            self._s.window_recovered = True
        self._s.window_level = max(self._s.window_level, self.tracker.level)
        self._s.history.extend(new)
        return new

    def _message(self, e, step: int) -> str:
        if e.kind == "recovery":
            return (f"audio_loss recovered: >= {self.warning:g} since step {e.step} ({e.value:.4g} at step {step}) "
                    f"after {e.step - e.episode_start} steps of an episode below the warning threshold that began "
                    f"at step {e.episode_start}")
        if e.kind == "sustained":
            return (f"audio_loss below {self.warning:g} for the {step - e.episode_start + 1} steps "
                    f"{e.episode_start}-{step} (window {self.window}; excursions above shorter than "
                    f"{self.recovery_steps} steps do not count): sustained collapse")
        return (f"audio_loss {e.value:.4g} < {e.threshold:g} ({e.kind}) at step {step}: the audio loss is collapsing "
                f"towards 0, a trivial task (most often the audio loss computed without the one-position shift, or "
                f"label_audio_ids equal to audio_out_ids; see `higgs-diag explain HD201`)")

    def pop_log_metrics(self) -> dict[str, float]:
        """The metrics for the next training log entry (and reset the window)."""
        s = self._s
        out: dict[str, float] = {"audio_alert_level": float(s.window_level)}
        if s.window_recovered:
            out["audio_alert_recovered"] = 1.0
        s.window_level, s.window_recovered = 0, False
        return out

    # ---- callback hooks ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            logger.warning("AudioLossMonitor is not bound to a HiggsAudioTrainer: it needs the trainer's per-step "
                           "audio loss and batch and does nothing here (use higgs_diag.trainer.HiggsAudioTrainer)")

    def on_step_end(self, args, state, control, **kwargs):
        tr = self.trainer
        rec = getattr(tr, "last_step", None) if tr is not None else None
        if rec is None or rec.step != state.global_step:
            return
        for alert in self.update(rec.step, rec.audio_loss):
            if alert.kind == "critical" and not self._s.dumped:
                self._s.dumped = True
                alert = self._dump(alert, args, state, rec)
            log = logger.error if alert.kind in ("critical", "sustained") else logger.warning
            if alert.kind == "recovery":
                log = logger.info
            log("[higgs-diag monitor] %s", alert.message)
            if alert.kind == "critical" and self.stop_on_critical:
                control.should_save = True
                control.should_training_stop = True
                logger.error("[higgs-diag monitor] stop_on_critical=True: saving checkpoint-%d and stopping training",
                             state.global_step)

    def _dump(self, alert: Alert, args, state, rec) -> Alert:
        if not self.save_batch or self.trainer is None or not state.is_world_process_zero:
            return alert
        batch = getattr(self.trainer, "current_batch", None)
        if batch is None:
            return alert
        folder = self.dump_dir or os.path.join(args.output_dir, "higgs-diag", "batches")
        path = os.path.join(folder, f"step-{rec.step:06d}.pt")
        meta: dict[str, Any] = {"step": rec.step, "losses": rec.as_dict(), "alert": alert.kind,
                                "threshold": alert.threshold, "source": "higgs_diag.trainer.AudioLossMonitor"}
        try:
            save_batch(path, batch, meta)
        except Exception as e:  # a failed dump must not kill training; say why
            logger.error("[higgs-diag monitor] could not save the batch of step %d to %s: %s", rec.step, path, e)
            return alert
        ckpt = os.path.join(args.output_dir, f"checkpoint-{rec.step}")
        when = "(saved now: stop_on_critical=True)" if self.stop_on_critical else \
            "(or the nearest checkpoint: set stop_on_critical=True to save this one)"
        msg = (f"{alert.message}; the batch of this step (its last micro-batch) is saved to {path}; replay it with "
               f"`higgs-diag replay-batch {ckpt} {path}` {when}")
        new = Alert(alert.kind, alert.step, alert.value, alert.threshold, msg, dump=path)
        self._s.history[self._s.history.index(alert)] = new
        return new
