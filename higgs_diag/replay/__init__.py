"""``higgs-diag replay-batch``: rerun saved batches through a checkpoint and name the cause.

    import higgs_diag
    diag = higgs_diag.replay("out/checkpoint-500", ["out/higgs-diag/batches/step-000500.pt"])

This package's ``__init__`` and ``evidence`` stay free of torch (the checks import the evidence types); the
loading and the forward pass (``model``, ``measure``, ``api``) import torch, and boson_multimodal only when a
model is replayed, with a one-line message naming the missing package.
"""
from __future__ import annotations

from .errors import ReplayError

__all__ = ["replay", "replay_evidence", "ReplayError"]


def replay(checkpoint=None, batches=(), **kwargs):
    """Replay ``batches`` (files or folders) through ``checkpoint``: a :class:`higgs_diag.diagnosis.Diagnosis`.
    See :func:`higgs_diag.replay.api.replay` for the options."""
    from .api import replay as _replay

    return _replay(checkpoint, batches, **kwargs)


def replay_evidence(checkpoint=None, batches=(), **kwargs):
    """The measurements behind :func:`replay` (a ``ReplayEvidence``), without the findings."""
    from .api import replay_evidence as _ev

    return _ev(checkpoint, batches, **kwargs)


# `higgs_diag.replay(...)` is the public function, and `higgs_diag.replay` is also this package: once the package
# is imported it replaces the function attribute on `higgs_diag`, so the package itself is made callable.
class _CallablePackage(__import__("types").ModuleType):
    def __call__(self, checkpoint=None, batches=(), **kwargs):
        return replay(checkpoint, batches, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallablePackage
