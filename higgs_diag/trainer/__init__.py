"""The bundled, fixed Higgs Audio v2 trainer: replace ``transformers.Trainer`` (or a community subclass of it)
with :class:`HiggsAudioTrainer`.

    from higgs_diag.trainer import HiggsAudioTrainer

It computes the shifted dual loss of :mod:`higgs_diag.losses`, logs ``text_loss``, ``audio_loss``,
``audio_loss_cb{k}`` and the valid target counts (token-weighted over gradient accumulation and DDP ranks),
always reports a real ``eval_loss``, validates the configuration at start-up and every batch before its
forward, guards the collator against boson's in-place writes, watches the audio loss
(:class:`AudioLossMonitor`) and resumes under torch >= 2.6. See docs/trainer.md.

This package imports transformers (and boson_multimodal / peft where needed); ``higgs_diag`` itself and
``higgs-diag analyze`` never import it.
"""
from __future__ import annotations

try:  # peft 0.21 on some CPU torch builds needs torch.distributed.tensor imported before it (FACTS.md §1)
    import torch.distributed.tensor  # noqa: F401
except Exception:  # pragma: no cover - builds without distributed support
    pass

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("higgs_diag.trainer needs transformers>=4.45,<4.47: pip install 'higgs-diag[model]'") from e

from .collator import GuardedCollator, copy_sample, guard_collator
from .core import LABEL_NAMES, HiggsAudioTrainer, StepLosses
from .lora import apply_lora, lora_config
from .monitor import Alert, AudioLossMonitor
from .resume import load_rng_state_safely
from .validation import Problem, StartupValidationError, validate_training_args

__all__ = [
    "HiggsAudioTrainer", "AudioLossMonitor", "Alert", "apply_lora", "lora_config", "validate_training_args",
    "StartupValidationError", "Problem", "guard_collator", "GuardedCollator", "copy_sample", "StepLosses",
    "LABEL_NAMES", "load_rng_state_safely",
]
