"""Replay on the batch dumps users really have (issue: step-aware evidence): dumps at the first step, between
two saves and at the last step, several checkpoints kept, LoRA, a wrapper, a resumed run; and the faults that
hid behind them (fixtures/make_replay.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("boson_multimodal")

import higgs_diag  # noqa: E402
from higgs_diag.checks import REGISTRY  # noqa: E402
from higgs_diag.checks.replay import aggregate  # noqa: E402
from higgs_diag.checks._replay_util import Vote, pairing  # noqa: E402
from higgs_diag.cli import main  # noqa: E402
from higgs_diag.config import Thresholds  # noqa: E402
from higgs_diag.diagnosis import Severity  # noqa: E402
from higgs_diag.evidence import BatchRecord, LoggedLosses, ReplayEvidence  # noqa: E402
from _cli_util import runner, tree_digest  # noqa: E402

REPLAY = Path(__file__).resolve().parents[1] / "fixtures" / "replay"
HEALTHY = ["healthy-steps", "healthy-lora-steps", "healthy-wrapper-steps", "healthy-resumed", "healthy-voice-clone"]


def _replayed(name: str, **kw):
    return higgs_diag.analyze(REPLAY / name, replay=True, **kw)


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_runs_with_dumps_anywhere_stay_quiet(name):
    before = tree_digest(REPLAY / name)
    diag = _replayed(name)
    loud = [(f.code, str(f.severity), f.title) for f in diag.at_or_above(Severity.WARNING)]
    assert loud == [], loud
    rep = diag.summary["replay"]
    assert rep["n_batches"] >= 3 and rep["skipped"] is None
    # every batch went through the checkpoint nearest its step
    cks = [c["step"] for c in rep["checkpoints"]]
    for b in rep["batches"]:
        assert b["checkpoint_step"] == min(cks, key=lambda c: (abs(c - b["step"]), c > b["step"]))
    assert tree_digest(REPLAY / name) == before  # read-only


def test_step1_batch_is_not_compared_with_a_later_checkpoint():
    """The false critical that started it: the step-1 dump's logged loss (base weights) against the last
    checkpoint's unshifted CE, which the trained weights happen to land near."""
    run = REPLAY / "healthy-steps"
    diag = higgs_diag.analyze(run, batches=[run / "higgs-diag" / "batches" / "step-000001.pt"],
                              checkpoint=run / "checkpoint-150")
    b = diag.summary["replay"]["batches"][0]
    m = b["model"]
    logged = b["logged"]["values"]["audio_loss"]
    # the trap is real: the logged loss is closer to the unshifted CE of these weights than to the shifted one
    assert abs(logged - m["audio_ce_unshifted"]) < abs(logged - m["audio_ce"])
    assert not diag.by_code("HD801") and not diag.at_or_above(Severity.WARNING)


def test_pairing_rule():
    t = Thresholds()

    def rec(step, ck, values):
        return BatchRecord(path="b.pt", step=step, checkpoint_step=ck,
                           logged=LoggedLosses("batch dump", step, values, exact=True))

    ev = ReplayEvidence(source=None, batches=[])
    assert pairing(rec(150, 150, {"audio_loss": 2.0}), ev, t)[0] == "exact"
    level, why = pairing(rec(1, 150, {"audio_loss": 2.0}), ev, t)
    assert level is None and "after" in why
    level, why = pairing(rec(170, 100, {"audio_loss": 2.0}), ev, t)
    assert level is None and "replay_pair_max_steps" in why
    assert pairing(rec(None, 100, {"audio_loss": 2.0}), ev, t)[0] is None  # unknown step: --batch-step
    # a slightly older checkpoint counts only while the logged loss held over the span
    import numpy as np
    import pandas as pd

    from higgs_diag.run.model import Run

    steps = np.arange(1, 201)
    loss = np.where(steps < 100, 3.0 - 0.02 * steps, 1.0)  # falls 2% a step until step 100, then flat
    ev.run = Run(root="r", scalars=pd.DataFrame({"step": steps, "metric": "audio_loss", "value": loss,
                                                 "source": "trainer_state", "wall_time": np.nan, "file": "s",
                                                 "segment": 0}))
    level, why = pairing(rec(60, 45, {"audio_loss": 1.8}), ev, t)
    assert level is None and "moved" in why
    assert pairing(rec(150, 140, {"audio_loss": 1.0}), ev, t)[0] == "near"


def test_aggregation_rule_one_discordant_batch_is_never_critical():
    def votes(*vs):
        return [Vote(BatchRecord(path=f"{i}.pt"), v, "internal", "") for i, v in enumerate(vs)]

    assert aggregate(votes("unshifted")) == Severity.CRITICAL
    assert aggregate(votes("unshifted", "unshifted", "shifted")) == Severity.CRITICAL
    assert aggregate(votes("unshifted", "shifted")) == Severity.WARNING
    assert aggregate(votes("unshifted", "shifted", "shifted")) == Severity.INFO
    assert aggregate(votes("shifted", "shifted")) is None


def test_two_faults_at_once_unshifted_leads():
    """Labels copied from the inputs AND an unshifted loss, LoRA, only the total loss logged, mild collapse:
    both are named and the unshifted loss (the fix that matters most) leads."""
    diag = _replayed("labels-are-inputs-unshifted-lora")
    codes = [f.code for f in diag.findings]
    assert codes[0] == "HD801" and diag.findings[0].severity == Severity.CRITICAL, codes
    assert "HD802" in codes
    assert any("audio share of loss" in e for e in diag.findings[0].evidence)


def test_no_learning_leads_with_and_without_replay():
    """grad_norm exactly 0 at every step and LoRA B still zero: nothing about the data matters yet."""
    for diag in (higgs_diag.analyze(REPLAY / "no-backward-lora"), _replayed("no-backward-lora")):
        assert diag.findings[0].code == "HD401", [f.code for f in diag.findings]
    diag = _replayed("no-backward-lora")
    hd811 = diag.by_code("HD811")
    assert hd811 and hd811[0].caused_by == "HD401"
    assert any("lora_B" in e for e in hd811[0].evidence) and any("identical" in e for e in hd811[0].evidence)
    assert "HD802" in [f.code for f in diag.findings]  # the data fault is still named, after the cause


@pytest.mark.parametrize("name", HEALTHY)
def test_weights_moved_on_healthy_runs(name):
    assert not _replayed(name).by_code("HD811")


def test_audio_target_leak():
    diag = _replayed("audio-target-leak")
    assert diag.findings[0].code == "HD812" and diag.findings[0].severity == Severity.CRITICAL
    assert not _replayed("healthy-voice-clone").by_code("HD812")  # the same data with another reference


def test_text_labels_misaligned():
    diag = _replayed("text-labels-misaligned")
    assert diag.findings[0].code == "HD813", [f.code for f in diag.findings]
    assert any("unexpanded" in e for e in diag.findings[0].evidence)
    for name in HEALTHY:
        assert not _replayed(name).by_code("HD813")


def test_all_checkpoints_replays_every_batch_through_every_checkpoint():
    diag = _replayed("healthy-steps", all_checkpoints=True)
    rep = diag.summary["replay"]
    assert len(rep["batches"]) == 3 * 3 and len(rep["checkpoints"]) == 3
    assert not diag.at_or_above(Severity.WARNING)


def test_batch_step_for_a_users_file(tmp_path):
    """A batch file with no step in its name and no dump meta pairs with a checkpoint through --batch-step."""
    import torch

    from higgs_diag.batch import load_batch

    tensors, _ = load_batch(REPLAY / "healthy-steps" / "higgs-diag" / "batches" / "step-000150.pt")
    mine = tmp_path / "my_batch.pt"
    torch.save(tensors, mine)
    run = REPLAY / "healthy-steps"
    r = runner().invoke(main, ["analyze", str(run), "--batches", str(mine), "--batch-step", "150", "--format", "json"])
    import json

    b = json.loads(r.stdout)["summary"]["replay"]["batches"][0]
    assert b["step"] == 150 and b["step_from"] == "--batch-step" and b["checkpoint_step"] == 150, r.stderr
    diag = higgs_diag.replay_batch(run / "checkpoint-100", [mine])
    assert diag.summary["replay"]["batches"][0]["step"] is None  # nothing says its step: no logged comparison


def test_new_replay_rules_are_documented():
    for code in ("HD810", "HD811", "HD812", "HD813"):
        assert REGISTRY[code].why and REGISTRY[code].fix
