"""Runs made the way the community trainers make them (fixtures/community, fixtures/make_community_runs.py):
each gets the right first finding from its logs alone, and the healthy ones stay quiet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import higgs_diag
from higgs_diag.checks import load_all
from higgs_diag.config import Thresholds
from higgs_diag.diagnosis import Severity
from higgs_diag.run.model import Run

COMMUNITY = Path(__file__).resolve().parents[1] / "fixtures" / "community"


def _run(frames: dict[str, tuple[list[int], list[float]]], **attrs) -> Run:
    df = pd.concat([pd.DataFrame({"step": np.asarray(s, dtype="int64"), "metric": m, "value": np.asarray(v, float),
                                  "source": "trainer_state", "wall_time": np.nan, "file": "s", "segment": 0})
                    for m, (s, v) in frames.items()], ignore_index=True)
    run = Run(root="r", scalars=df)
    for k, v in attrs.items():
        setattr(run, k, v)
    return run


def test_half_weights_without_amp_names_the_cause():
    steps = list(range(1, 11))
    nan_grad = [4.9] + [float("nan")] * 9
    zero_loss = [6.9] + [0.0] * 9
    run = _run({"loss": (steps, zero_loss), "grad_norm": (steps, nan_grad)},
               model_config={"model_type": "higgs_audio", "torch_dtype": "float16"}, model_config_file="ev",
               args={"fp16": False, "bf16": False}, args_file="ev")
    f = list(load_all()["HD307"].func(run, Thresholds()))
    assert f and f[0].severity == Severity.CRITICAL and f[0].steps[0] == 2
    # mixed precision on, or float32 weights: not this cause
    run.args = {"fp16": True, "bf16": False}
    assert not list(load_all()["HD307"].func(run, Thresholds()))
    run.args = {"fp16": False, "bf16": False}
    run.model_config = {"torch_dtype": "float32"}
    assert not list(load_all()["HD307"].func(run, Thresholds()))


def test_constant_eval_loss_is_explained_by_no_learning():
    steps = list(range(1, 41))
    run = _run({"loss": (steps, [6.95] * 40), "grad_norm": (steps, [0.0] * 40),
                "eval_loss": ([10, 20, 30, 40], [6.91] * 4)}, args={"metric_for_best_model": "eval_loss"})
    from higgs_diag.api import diagnose

    diag = diagnose(run)
    codes = [(f.code, f.caused_by) for f in diag.findings]
    assert codes[0] == ("HD401", None) and ("HD103", "HD401") in codes, codes
    assert "weights never change" in diag.by_code("HD103")[0].title


@pytest.mark.skipif(not COMMUNITY.is_dir(), reason="fixtures/community missing")
def test_overfitting_leads_and_explains_the_collapsing_train_loss():
    diag = higgs_diag.analyze(COMMUNITY / "overfit-collapsing-train")
    assert diag.findings[0].code == "HD405", [(f.code, str(f.severity)) for f in diag.findings]
    for code in ("HD201", "HD204"):
        for f in diag.by_code(code):
            assert f.severity <= Severity.WARNING and f.caused_by == "HD405"


@pytest.mark.skipif(not COMMUNITY.is_dir(), reason="fixtures/community missing")
def test_release_geometry_collapse_and_healthy():
    """8 codebooks x 1026 classes: the seed's own levels apply unscaled; the unshifted run collapses, the shifted
    one stays quiet."""
    bad = higgs_diag.analyze(COMMUNITY / "release-geometry-unshifted")
    assert bad.findings[0].code in ("HD201", "HD204") and bad.findings[0].severity == Severity.CRITICAL
    good = higgs_diag.analyze(COMMUNITY / "release-geometry-healthy")
    assert not good.at_or_above(Severity.WARNING), [(f.code, f.title) for f in good.findings]


# the first finding each community-style run gets from its logs alone (no replay)
EXPECTED = {
    "total-loss-console-collapse": ("HD204", Severity.CRITICAL),  # only the total logged; components printed
    "eval-crash-batch-object": ("HD011", Severity.CRITICAL),
    "sigterm-midrun": ("HD010", Severity.WARNING),
    "fp16-weights-no-amp": ("HD307", Severity.CRITICAL),
    "overfit-collapsing-train": ("HD405", Severity.WARNING),
    "release-geometry-unshifted": ("HD201", Severity.CRITICAL),
}
QUIET = ["custom-loop-console-only", "release-geometry-healthy", "interleaved-ranks"]


@pytest.mark.skipif(not COMMUNITY.is_dir(), reason="fixtures/community missing")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_community_run_leads_with_its_cause(name):
    code, sev = EXPECTED[name]
    diag = higgs_diag.analyze(COMMUNITY / name)
    lead = diag.findings[0]
    assert (lead.code, lead.severity) == (code, sev), [(f.code, str(f.severity), f.caused_by) for f in diag.findings]


@pytest.mark.skipif(not COMMUNITY.is_dir(), reason="fixtures/community missing")
@pytest.mark.parametrize("name", QUIET)
def test_healthy_community_runs_stay_quiet(name):
    diag = higgs_diag.analyze(COMMUNITY / name)
    assert not diag.at_or_above(Severity.WARNING), [(f.code, f.title) for f in diag.findings]


def test_checkpoint_dtype_is_read_from_the_header_not_loaded():
    from higgs_diag.run.checkpoint_meta import weights_dtype

    root = Path(__file__).resolve().parents[1] / "fixtures"
    assert weights_dtype(root / "replay" / "healthy" / "checkpoint-200")[0] == "float32"
    if COMMUNITY.is_dir():
        dt, where = weights_dtype(COMMUNITY / "fp16-weights-no-amp" / "checkpoint-60")
        assert dt == "float16" and "safetensors header" in where
