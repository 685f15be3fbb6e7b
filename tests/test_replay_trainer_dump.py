"""End to end with the bundled trainer: `higgs_diag.trainer.HiggsAudioTrainer` with an unshifted loss variant,
its AudioLossMonitor dumping the batch of the first critical step and saving that checkpoint
(stop_on_critical=True); `replay-batch` on exactly what the monitor's message says to run names the cause."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

trainer_mod = pytest.importorskip("higgs_diag.trainer")
import make_runs as M  # noqa: E402

import higgs_diag  # noqa: E402
from higgs_diag.losses import higgs_audio_loss  # noqa: E402


class UnshiftedHiggsAudioTrainer(trainer_mod.HiggsAudioTrainer):
    def compute_dual_loss(self, outputs, batch):  # the community bug, as a variant of the trainer's loss
        return higgs_audio_loss(outputs, batch.get("label_audio_ids"), unshifted=True)


def test_monitor_dump_and_checkpoint_replay_to_the_unshifted_cause(tmp_path):
    out = tmp_path / "run"
    args = M.base_args(out, "run", max_steps=800, save_steps=10_000, learning_rate=5e-3,
                       lr_scheduler_type="constant_with_warmup", **M.LABEL_NAMES)
    # the seed's levels as given (not scaled to the tiny model's 18 classes): the run stops at its first step
    # below 0.005, which keeps this end-to-end test short
    monitor = trainer_mod.AudioLossMonitor(warning=0.01, critical=0.005, stop_on_critical=True)
    train, _ = M.data(n_train=512)
    tr = UnshiftedHiggsAudioTrainer(model=M.tiny_model(), args=args, train_dataset=train, data_collator=M.collate,
                                    audio_monitor=monitor, startup_validation="warn")
    tr.train()
    dumps = sorted((out / "higgs-diag" / "batches").glob("step-*.pt"))
    assert len(dumps) == 1, "the monitor dumps the batch of its first critical alert"
    step = int(dumps[0].stem.split("-")[1])
    ckpt = out / f"checkpoint-{step}"
    assert ckpt.is_dir() and tr.state.global_step == step
    diag = higgs_diag.replay_batch(ckpt, dumps)
    f = diag.findings[0]
    assert f.code == "HD801", [x.title for x in diag.findings]
    b = diag.summary["replay"]["batches"][0]
    assert b["logged"]["source"] == "batch dump" and b["logged"]["values"]["audio_loss"] < 0.005
