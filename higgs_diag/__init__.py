"""higgs-diag: root-cause diagnosis for Higgs Audio v2 fine-tuning runs."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_run", "analyze", "replay"]


def load_run(path, log_files=None):
    """Read a run directory (or one checkpoint, a logging folder, one trainer_state.json)."""
    from .run.load import load_run as _load_run

    return _load_run(path, log_files=log_files)


def analyze(path, thresholds=None, log_files=None):
    """Read a run and run every check: returns a :class:`higgs_diag.diagnosis.Diagnosis`."""
    from .api import analyze as _analyze

    return _analyze(path, thresholds=thresholds, log_files=log_files)


def replay(checkpoint=None, batches=(), **kwargs):
    """Replay saved batches through a checkpoint and name the cause: returns a
    :class:`higgs_diag.diagnosis.Diagnosis` (see :func:`higgs_diag.replay.api.replay` for the options:
    ``run``, ``base``, ``lora_alpha``, ``no_model``, ``device``, ``dtype``, ``thresholds``)."""
    from .replay.api import replay as _replay

    return _replay(checkpoint, batches, **kwargs)
