"""The replay measures: it loads a checkpoint offline (full model, PEFT adapter or wrapper state dict, nothing
unpickled) and reruns saved batches through it, returning a :class:`higgs_diag.evidence.ReplayEvidence` of
plain numbers. It never judges: the rules in ``higgs_diag.checks`` do, and ``higgs_diag.api`` composes both
(``higgs_diag.replay_batch(...)``, ``higgs_diag.analyze(run_dir, replay=True)``).

This package's ``__init__`` stays free of torch; ``api``, ``model`` and ``measure`` import torch, and
boson_multimodal only when a model is replayed, with a one-line message naming the missing package.
"""
from __future__ import annotations

from .errors import ReplayError

__all__ = ["ReplayError"]
