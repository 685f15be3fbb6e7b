"""The audio-loss monitor (seed 004) on a real collapsing run: the unshifted audio loss (the copy task of
boson-ai/higgs-audio#94) trained by HiggsAudioTrainer on the tiny model, plus the rule itself step by step."""
from __future__ import annotations

import math

import logging

import pytest
import torch
from safetensors.torch import load_file

import higgs_diag
from higgs_diag.batch import BatchSpec, load_batch, validate_batch
from higgs_diag.config import Thresholds
from higgs_diag.diagnosis import Severity
from higgs_diag.losses import higgs_audio_loss
from higgs_diag.trainer import AudioLossMonitor, HiggsAudioTrainer

from _trainer_util import M, targs


class UnshiftedTrainer(HiggsAudioTrainer):
    """The community bug, on purpose: the audio CE at the same position as its label (losses.py unshifted=True)."""

    def compute_dual_loss(self, outputs, batch):
        return higgs_audio_loss(outputs, batch.get("label_audio_ids"), unshifted=True)


@pytest.fixture(scope="module")
def collapse(tmp_path_factory):
    out = tmp_path_factory.mktemp("collapse") / "run"
    train, _ = M.data(n_train=512, n_eval=1)
    args = targs(out, max_steps=300, per_device_train_batch_size=8, learning_rate=2e-2, warmup_steps=10,
                 lr_scheduler_type="constant_with_warmup", report_to=["tensorboard"], logging_dir=str(out / "tb"))
    monitor = AudioLossMonitor(window=20, stop_on_critical=True)  # thresholds: Thresholds() (0.01 / 0.005)
    trainer = UnshiftedTrainer(model=M.tiny_model(), args=args, train_dataset=train, data_collator=M.collate,
                               audio_monitor=monitor)
    logger = logging.getLogger("higgs_diag.trainer")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        trainer.train()
    finally:
        logger.removeHandler(handler)
    return out, trainer, monitor, records


def test_monitor_fires_warning_sustained_critical_and_stops(collapse):
    out, trainer, monitor, records = collapse
    kinds = [a.kind for a in monitor.alerts]
    # warning, then sustained, then critical (a loss hovering at the scaled level may recover in between)
    first = {k: kinds.index(k) for k in ("warning", "sustained", "critical")}
    assert first["warning"] < first["sustained"] < first["critical"], kinds
    warn, sus, crit = (monitor.alerts[first[k]] for k in ("warning", "sustained", "critical"))
    episode = max(a.step for a in monitor.alerts[:first["sustained"]] if a.kind == "warning")
    # the seed's levels (0.01 / 0.005, set for the release's 1026 classes) scaled to the tiny model's 18 classes:
    # the same fraction of the uniform reference ln(codebook_size + 2)
    scale = math.log(18) / math.log(1026)
    assert monitor.warning == pytest.approx(0.01 * scale) and monitor.critical == pytest.approx(0.005 * scale)
    assert warn.value < monitor.warning and crit.value < monitor.critical
    assert warn.step < sus.step < crit.step and sus.step - episode + 1 >= 20
    assert trainer.state.global_step == crit.step < 300  # stop_on_critical
    assert (out / f"checkpoint-{crit.step}" / "model.safetensors").is_file()  # saved for replay
    msgs = [r.getMessage() for r in records]
    assert any("(critical) at step" in m and "replay-batch" in m for m in msgs)
    levels = {e["step"]: e["audio_alert_level"] for e in trainer.state.log_history if "audio_alert_level" in e}
    assert levels[warn.step - 1] == 0 and levels[warn.step] == 1 and levels[crit.step] == 3


def test_critical_alert_dumps_the_batch_for_replay(collapse):
    out, trainer, monitor, _ = collapse
    crit = next(a for a in monitor.alerts if a.kind == "critical")
    path = out / "higgs-diag" / "batches" / f"step-{crit.step:06d}.pt"
    assert monitor.dump_path == str(path) and path.is_file()
    tensors, meta = load_batch(path)  # weights_only=True
    assert meta["step"] == crit.step and meta["alert"] == "critical"
    assert meta["losses"]["audio_loss"] == pytest.approx(crit.value) and meta["losses"]["audio_loss"] < 0.005
    assert validate_batch(tensors, BatchSpec.from_config(M.tiny_config())) == []  # the batch is fine: the loss is not
    # the ingredients of replay: the saved weights copy (unshifted ~0) but cannot predict (shifted >> 0)
    model = M.tiny_model()
    model.load_state_dict(load_file(str(out / f"checkpoint-{crit.step}" / "model.safetensors")), strict=False)
    with torch.no_grad():
        outputs = model.eval()(**tensors)
    copy = higgs_audio_loss(outputs, tensors["label_audio_ids"], unshifted=True).audio_loss
    real = higgs_audio_loss(outputs, tensors["label_audio_ids"]).audio_loss
    assert float(copy) < 0.05 and float(real) > 1.0


def test_analyze_sees_the_collapse_the_monitor_caught(collapse):
    out, *_ = collapse
    diag = higgs_diag.analyze(out)
    assert diag.findings[0].code == "HD201" and diag.findings[0].severity == Severity.CRITICAL


def test_rule_step_by_step_recovery_hysteresis_and_thresholds():
    m = AudioLossMonitor(thresholds=Thresholds(audio_loss_warning=0.5, audio_loss_critical=0.2,
                                               audio_sustained_window=5), recovery_steps=3)
    assert (m.warning, m.critical, m.window) == (0.5, 0.2, 5)
    seq = [1.0, 0.4, 0.6, 0.45, 0.3, 0.1, 0.15, 0.9, 0.8, 0.7, 0.6, None, float("nan"), 0.4]
    fired = {step: [a.kind for a in m.update(step, v)] for step, v in enumerate(seq, 1)}
    assert fired[2] == ["warning"]
    assert fired[3] == []  # one step back above is not a recovery (hysteresis) ...
    assert fired[6] == ["sustained", "critical"] or fired[6] == ["critical", "sustained"]
    assert fired[10] == ["recovery"]  # ... three steps in a row are (8, 9, 10)
    assert fired[12] == [] and fired[13] == []  # no audio target / non-finite: skipped
    assert fired[14] == ["warning"]  # a new episode
    rec = m.recoveries[0]
    assert rec.step == 8 and "since step 8" in rec.message
    assert m.pop_log_metrics() == {"audio_alert_level": 3.0, "audio_alert_recovered": 1.0}
    assert m.pop_log_metrics() == {"audio_alert_level": 0.0}
    with pytest.raises(ValueError):
        AudioLossMonitor(warning=0.001, critical=0.01)


def test_healthy_training_raises_no_alert(tmp_path):
    train, _ = M.data(n_train=256, n_eval=1)
    tr = HiggsAudioTrainer(model=M.tiny_model(), args=targs(tmp_path, max_steps=30), train_dataset=train,
                           data_collator=M.collate)
    tr.train()
    (monitor,) = tr.monitors
    assert monitor.alerts == [] and monitor.dump_path is None
    assert not (tmp_path / "higgs-diag").exists()
