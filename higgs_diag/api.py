"""The library face of ``higgs-diag analyze``: the CLI is a thin shell over these functions."""
from __future__ import annotations

import os

from .config import Thresholds
from .diagnosis import Diagnosis
from .run.load import load_run
from .run.model import Run


def summarize(run: Run) -> dict:
    """The ``summary`` block of the report: what was read."""
    st = run.state
    return {
        "steps": run.last_step,
        "n_points": run.n_points,
        "metrics": run.metrics,
        "files_read": list(run.files_read),
        "not_read": list(run.other_files),
        "trainer_state": st.path if st else None,
        "max_steps": st.max_steps if st else run.arg("max_steps"),
        "best_metric": st.best_metric if st and isinstance(st.best_metric, (int, float)) else None,
        "best_model_checkpoint": st.best_model_checkpoint if st else None,
        "checkpoints": [c.path for c in run.checkpoints],
        "args_from": run.args_file,
        "model_config_from": run.model_config_file,
        "problems": [str(p) for p in run.problems],
    }


def diagnose(run: Run, thresholds: Thresholds | None = None) -> Diagnosis:
    from .checks import run_checks

    findings = run_checks(run, thresholds or Thresholds())
    return Diagnosis(target=run.root, findings=findings, summary=summarize(run))


def analyze(path: str | os.PathLike, thresholds: Thresholds | None = None, log_files=None) -> Diagnosis:
    """Read the run at ``path`` and diagnose it. Raises ``RunReadError`` when nothing could be read."""
    return diagnose(load_run(path, log_files=log_files), thresholds)
