"""LoRA with Higgs-aware targets and self-contained adapter checkpoints; resuming an interrupted run under
torch >= 2.6 (where transformers 4.46 cannot load rng_state.pth) without turning weights-only loading off."""
from __future__ import annotations

import pickle

import pytest
import torch
from peft import PeftModel
from transformers import Trainer, TrainerCallback

from higgs_diag.trainer import HiggsAudioTrainer, apply_lora

from _trainer_util import M, targs


# ---- LoRA ----------------------------------------------------------------------------------------------------
def _adapted(peft_model):
    return sorted({n.split(".lora_A")[0].split("base_model.model.")[-1]
                   for n, _ in peft_model.named_parameters() if ".lora_A" in n})


def test_apply_lora_default_targets_and_audio_mlp_on_request():
    names = _adapted(apply_lora(M.tiny_model()))
    assert len(names) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(".self_attn." in n or ".mlp." in n for n in names)
    assert not any("audio_mlp" in n for n in names)
    with_audio = _adapted(apply_lora(M.tiny_model(), audio_mlp=True))
    assert sorted(set(with_audio) - set(names)) == [f"layers.1.audio_mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    peft_model = apply_lora(M.tiny_model(), r=4, alpha=8, dropout=0.0)
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.0)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_every_lora_checkpoint_is_loadable_on_its_own(tmp_path):
    train, evald = M.data(n_train=128, n_eval=8)
    model = apply_lora(M.tiny_model(), r=8, alpha=16, dropout=0.0)
    args = targs(tmp_path, max_steps=10, learning_rate=5e-3, save_strategy="steps", save_steps=5)
    tr = HiggsAudioTrainer(model=model, args=args, train_dataset=train, data_collator=M.collate)
    tr.train()
    for step in (5, 10):
        files = {p.name for p in (tmp_path / f"checkpoint-{step}").iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    loaded = PeftModel.from_pretrained(M.tiny_model(), str(tmp_path / "checkpoint-10")).eval()
    batch = M.collate(M.make_samples(4, 11))
    with torch.no_grad():
        ref = tr.model.eval()(**batch)
        got = loaded(**batch)
    assert torch.allclose(ref.audio_logits, got.audio_logits, atol=1e-6)
    assert not torch.allclose(got.audio_logits, M.tiny_model().eval()(**batch).audio_logits, atol=1e-3)  # trained


class Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs)


def test_a_peft_model_inside_a_wrapper_also_gets_adapter_files(tmp_path):
    train, _ = M.data(n_train=32, n_eval=1)
    args = targs(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    tr = HiggsAudioTrainer(model=Wrapper(apply_lora(M.tiny_model(), r=4, alpha=8)), args=args, train_dataset=train,
                           data_collator=M.collate)
    tr.train()
    files = {p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    assert {"model.safetensors", "adapter_model.safetensors", "adapter_config.json"} <= files
    PeftModel.from_pretrained(M.tiny_model(), str(tmp_path / "checkpoint-2"))


# ---- resume --------------------------------------------------------------------------------------------------
class Interrupt(TrainerCallback):
    """Kills the run at a step, like a preempted job."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"preempted at step {self.at}")


def _resume_args(out):
    return targs(out, max_steps=12, save_strategy="steps", save_steps=5, learning_rate=5e-3)


def _losses(trainer, first):
    return {e["step"]: (e["loss"], e["audio_loss"]) for e in trainer.state.log_history
            if "audio_loss" in e and e["step"] >= first}


def test_interrupted_run_resumes_like_it_never_stopped(tmp_path):
    train, _ = M.data(n_train=256, n_eval=1)

    def trainer(out, *cbs):
        return HiggsAudioTrainer(model=M.tiny_model(), args=_resume_args(out), train_dataset=train,
                                 data_collator=M.collate, callbacks=list(cbs))

    straight = trainer(tmp_path / "straight")
    straight.train()

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        trainer(out, Interrupt(7)).train()
    ckpt = out / "checkpoint-5"
    assert (ckpt / "rng_state.pth").is_file() and not (out / "checkpoint-10").exists()

    # transformers' own loader fails on this file under torch >= 2.6 (the bug) ...
    resumed = trainer(out)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Trainer._load_rng_state(resumed, str(ckpt))
    # ... HiggsAudioTrainer resumes, and the continuation matches the uninterrupted run step for step
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 12
    got, ref = _losses(resumed, 6), _losses(straight, 6)
    assert sorted(got) == list(range(6, 13))
    for step in got:
        assert got[step][0] == pytest.approx(ref[step][0], abs=1e-4)
        assert got[step][1] == pytest.approx(ref[step][1], abs=1e-5)
    # the weights-only protection is still on for everything else in the process
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt / "rng_state.pth")
