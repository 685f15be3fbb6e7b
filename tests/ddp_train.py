"""A two-process DDP run of HiggsAudioTrainer on CPU (gloo), launched by tests/test_trainer_ddp.py:

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_train.py OUT_DIR

The audio-loss monitor runs with thresholds above any real loss, so it dumps a batch at step 1 (rank 0 only).
Each rank writes what it logged (``OUT_DIR/rank{r}.json``) and its first training batch
(``OUT_DIR/batch-rank{r}.pt``), so the test can check that every rank logged the same, token-weighted numbers.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _trainer_util import M, targs  # noqa: E402

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from higgs_diag.batch import save_batch  # noqa: E402
from higgs_diag.trainer import AudioLossMonitor, HiggsAudioTrainer  # noqa: E402


class KeepFirstBatch(TrainerCallback):
    def __init__(self):
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            save_batch(Path(args.output_dir) / f"batch-rank{args.process_index}.pt", self.trainer.current_batch)


def main(out: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    train, evald = M.data(n_train=256, n_eval=16)
    args = targs(out, max_steps=6, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=3e-3,
                 warmup_steps=2, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
                 report_to=["tensorboard"], logging_dir=str(Path(out) / "tb"), ddp_backend="gloo")
    keep = KeepFirstBatch()
    # thresholds far above any real loss: the monitor's first alert is critical at step 1, so every rank
    # reaches the batch dump and only rank 0 may write it
    monitor = AudioLossMonitor(warning=100.0, critical=50.0, window=2)
    trainer = HiggsAudioTrainer(model=M.tiny_model(), args=args, train_dataset=train, eval_dataset=evald,
                                data_collator=M.collate, callbacks=[keep], audio_monitor=monitor)
    keep.trainer = trainer
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "world_size": args.world_size, "log_history": trainer.state.log_history,
        "is_world_process_zero": trainer.is_world_process_zero()}))


if __name__ == "__main__":
    main(sys.argv[1])
