"""higgs-diag: root-cause diagnosis for Higgs Audio v2 fine-tuning runs."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_run", "analyze", "replay_batch"]


def load_run(run_dir, log_files=None):
    """Read a run directory (or one checkpoint, a logging folder, one trainer_state.json): a ``Run``."""
    from .api import load_run as _load_run

    return _load_run(run_dir, log_files=log_files)


def analyze(run_dir, **kwargs):
    """Read a run, optionally replay its batches (``replay=True``), run the rules: a
    :class:`higgs_diag.diagnosis.Diagnosis`. See :func:`higgs_diag.api.analyze` for the options."""
    from .api import analyze as _analyze

    return _analyze(run_dir, **kwargs)


def replay_batch(checkpoint, batches, **kwargs):
    """Replay saved batches through a checkpoint and name the cause: a :class:`higgs_diag.diagnosis.Diagnosis`.
    See :func:`higgs_diag.api.replay_batch` for the options."""
    from .api import replay_batch as _replay_batch

    return _replay_batch(checkpoint, batches, **kwargs)
