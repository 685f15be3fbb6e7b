"""higgs_diag.trainer.HiggsAudioTrainer on the real HF Trainer and the real tiny HiggsAudioModel (CPU):
it learns, logs what analyze reads, always reports eval_loss, keeps the right best checkpoint, weights the
component losses by tokens, fixes the naive configuration that raises KeyError, and stops bad batches."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

import higgs_diag
from higgs_diag.batch import BatchValidationError
from higgs_diag.diagnosis import Severity
from higgs_diag.losses import higgs_audio_loss
from higgs_diag.trainer import LABEL_NAMES, HiggsAudioTrainer, StartupValidationError

from _trainer_util import UNIFORM, M, state, targs

TRAIN_KEYS = {"loss", "grad_norm", "learning_rate", "text_loss", "audio_loss", "n_text_targets", "n_audio_targets",
              "n_batches_no_audio_targets", "audio_alert_level"} | {f"audio_loss_cb{k}" for k in range(M.NUM_CODEBOOKS)}
EVAL_KEYS = {"eval_loss", "eval_text_loss", "eval_audio_loss", "eval_n_text_targets", "eval_n_audio_targets",
             "eval_n_batches_no_audio_targets"} | {f"eval_audio_loss_cb{k}" for k in range(M.NUM_CODEBOOKS)}


# ---- one healthy run, shared ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    out = tmp_path_factory.mktemp("healthy") / "run"
    train, evald = M.data(n_train=1024, n_eval=32)
    args = targs(out, max_steps=150, warmup_steps=10, learning_rate=3e-3, eval_strategy="steps", eval_steps=25,
                 save_strategy="steps", save_steps=25, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                 report_to=["tensorboard"], logging_dir=str(out / "runs" / "tb"))
    trainer = HiggsAudioTrainer(model=M.tiny_model(), args=args, train_dataset=train, eval_dataset=evald,
                                data_collator=M.collate)
    trainer.train()
    return out, trainer


def test_short_run_learns_and_logs_every_metric(healthy):
    out, trainer = healthy
    hist = state(out)["log_history"]
    train = [e for e in hist if "loss" in e]
    evals = [e for e in hist if "eval_loss" in e]
    assert len(train) == 150 and len(evals) == 6
    for e in train:
        assert TRAIN_KEYS <= set(e), TRAIN_KEYS - set(e)
        assert e["audio_alert_level"] == 0 and e["n_batches_no_audio_targets"] == 0
    for e in evals:
        assert EVAL_KEYS <= set(e), EVAL_KEYS - set(e)
    first, last10 = train[0]["audio_loss"], [e["audio_loss"] for e in train[-10:]]
    assert abs(first - UNIFORM) < 0.1  # starts at a uniform guess over 18 classes ...
    assert sum(last10) / 10 < UNIFORM - 0.6  # ... and learns: clearly below ln(codebook_size + 2)
    assert evals[-1]["eval_audio_loss"] < UNIFORM - 0.6
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # audio_loss is the mean of its codebooks; eval_loss = eval_text_loss + eval_audio_loss (one eval batch per
    # 8 samples, all of them full, so HF's batch mean equals the token-weighted value up to rounding)
    e = train[-1]
    assert e["audio_loss"] == pytest.approx(sum(e[f"audio_loss_cb{k}"] for k in range(4)) / 4)
    ev = evals[-1]
    assert ev["eval_loss"] == pytest.approx(ev["eval_text_loss"] + ev["eval_audio_loss"], rel=0.05)


def test_eval_loss_reaches_trainer_state_tensorboard_and_analyze(healthy):
    out, _ = healthy
    run = higgs_diag.load_run(out)
    tb = run.scalars[run.scalars["source"] == "tensorboard"]
    tb_metrics = set(tb["metric"].astype(str))
    assert {"eval_loss", "eval_audio_loss", "eval_text_loss", "audio_loss", "text_loss", "audio_loss_cb3",
            "n_audio_targets"} <= tb_metrics
    assert len(tb[tb["metric"] == "eval_loss"]) == 6
    assert run.args["label_names"] == list(LABEL_NAMES)  # the TensorBoard args summary shows the forced names
    diag = higgs_diag.analyze(out)
    loud = [(f.code, f.title) for f in diag.at_or_above(Severity.WARNING)]
    assert loud == [] and diag.verdict == "healthy"


def test_load_best_model_at_end_keeps_the_lowest_eval_loss(healthy):
    out, trainer = healthy
    st = state(out)
    evals = {e["step"]: e["eval_loss"] for e in st["log_history"] if "eval_loss" in e}
    best_step = min(evals, key=evals.get)
    assert st["best_metric"] == pytest.approx(evals[best_step])
    assert st["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    saved = load_file(str(out / f"checkpoint-{best_step}" / "model.safetensors"))
    live = trainer.model.state_dict()
    assert all(torch.equal(saved[k], live[k].cpu()) for k in saved)  # the final model is that checkpoint


# ---- token weighting -------------------------------------------------------------------------------------------
def _pick(n, seed, frames, **kw):
    """n fixture samples whose audio has exactly ``frames`` frames (so the halves below differ in target counts)."""
    return [s for s in M.make_samples(400, seed, **kw) if s["audio_codes"].shape[1] == frames][:n]


def _loss(model, samples):
    batch = M.collate([{k: v.clone() for k, v in s.items()} for s in samples])
    with torch.no_grad():
        return higgs_audio_loss(model.eval()(**batch), batch["label_audio_ids"]).as_floats()


class InOrder(HiggsAudioTrainer):
    """Sequential sampling, so that the test knows which samples form each micro-batch."""

    def _get_train_sampler(self):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def test_component_losses_are_token_weighted_over_accumulation_and_eval_batches(healthy, tmp_path):
    trained = copy.deepcopy(healthy[1].model)  # learned weights: learnable and random codes score differently
    easy, hard = _pick(8, 99, 11), _pick(4, 97, 8, random_codes=True)  # 48 vs 36 audio targets per sample
    train = easy[:4] + hard  # one optimizer step = 2 micro-batches of 4 (lr 0: the eval sees the same weights)
    evals = easy + hard  # eval batches of 8 and 4
    args = targs(tmp_path, max_steps=1, gradient_accumulation_steps=2, learning_rate=0.0, warmup_steps=0,
                 eval_strategy="steps", eval_steps=1)
    tr = InOrder(model=copy.deepcopy(trained), args=args, train_dataset=M.SyntheticTTS(train),
                 eval_dataset=M.SyntheticTTS(evals), data_collator=M.collate)
    tr.train()
    for logged, samples, halves, prefix in (
            (next(e for e in tr.state.log_history if "loss" in e), train, (train[:4], train[4:]), ""),
            (next(e for e in tr.state.log_history if "eval_loss" in e), evals, (evals[:8], evals[8:]), "eval_")):
        union = _loss(trained, samples)  # one batch holding every sample: the token-weighted truth
        for key in ["audio_loss", "text_loss", *[f"audio_loss_cb{k}" for k in range(4)]]:
            assert logged[prefix + key] == pytest.approx(union[key], abs=2e-5), key
        assert logged[prefix + "n_audio_targets"] == union["n_audio_targets"]
        naive = sum(_loss(trained, h)["audio_loss"] for h in halves) / 2  # a mean of batch means is not it
        assert abs(naive - union["audio_loss"]) > 0.01


# ---- the naive configuration: the bug and the fix ---------------------------------------------------------------
def _naive_args(out):
    return targs(out, max_steps=3, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss")


def test_naive_wrapper_config_raises_keyerror_with_trainer_not_with_higgs_audio_trainer(tmp_path):
    train, evald = M.data(n_train=64, n_eval=8)
    plain = Trainer(model=M.HiggsAudioForTraining(M.tiny_model()), args=_naive_args(tmp_path / "plain"),
                    train_dataset=train, eval_dataset=evald, data_collator=M.collate)
    assert plain.label_names == []
    with pytest.raises(KeyError, match="eval_loss"):
        plain.train()

    fixed = HiggsAudioTrainer(model=M.HiggsAudioForTraining(M.tiny_model()), args=_naive_args(tmp_path / "fixed"),
                              train_dataset=train, eval_dataset=evald, data_collator=M.collate)
    assert fixed.label_names == list(LABEL_NAMES)
    fixed.train()
    st = state(tmp_path / "fixed")
    ev = [e for e in st["log_history"] if "eval_loss" in e]
    assert len(ev) == 1 and math.isfinite(ev[0]["eval_loss"]) and ev[0]["eval_loss"] > 1.0
    assert st["best_metric"] == pytest.approx(ev[0]["eval_loss"])


class PassThrough(torch.nn.Module):
    """A wrapper that returns HiggsAudioModel's outputs unchanged: the trainer computes and logs every loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs)


def test_wrapper_returning_model_outputs_gets_component_losses(tmp_path):
    train, evald = M.data(n_train=64, n_eval=8)
    tr = HiggsAudioTrainer(model=PassThrough(M.tiny_model()), args=_naive_args(tmp_path), train_dataset=train,
                           eval_dataset=evald, data_collator=M.collate)
    tr.train()
    hist = tr.state.log_history
    assert all(TRAIN_KEYS <= set(e) for e in hist if "loss" in e)
    assert EVAL_KEYS <= set(next(e for e in hist if "eval_loss" in e))


def test_batches_as_plain_attribute_objects_train(tmp_path):
    """A collator returning an object with boson's field names as attributes (no dict, no dataclass), unguarded:
    HF's loop would call len()/in on it; the trainer converts it."""
    from types import SimpleNamespace

    train, _ = M.data(n_train=32, n_eval=1)
    tr = HiggsAudioTrainer(model=M.tiny_model(), args=targs(tmp_path, max_steps=3), train_dataset=train,
                           data_collator=lambda s: SimpleNamespace(**M.collate(s)), guard_collator=False,
                           startup_validation="off")
    tr.train()
    assert tr.state.global_step == 3 and all("audio_loss" in e for e in tr.state.log_history if "loss" in e)


# ---- batch validation ---------------------------------------------------------------------------------------
def _drop_audio_out(b):
    b.pop("audio_out_ids")


def _labels_are_inputs(b):
    b["label_audio_ids"] = b["audio_out_ids"].clone()


def _all_masked(b):
    b["label_audio_ids"] = torch.full_like(b["label_audio_ids"], -100)


def _shape_mismatch(b):
    b["label_audio_ids"] = b["label_audio_ids"][:, :-2]


BAD = [(_drop_audio_out, "missing-field", "audio_out_ids"), (_labels_are_inputs, "labels-are-inputs", "label_audio_ids"),
       (_all_masked, "all-audio-masked", "label_audio_ids"), (_shape_mismatch, "shape-mismatch", "label_audio_ids")]


def bad_collate(fault):
    def collate(samples):
        b = M.collate(samples)
        fault(b)
        return b
    return collate


@pytest.mark.parametrize("fault, kind, field", BAD, ids=[k for _, k, _ in BAD])
def test_each_bad_batch_kind_stops_training_before_the_forward(tmp_path, fault, kind, field):
    train, _ = M.data(n_train=16, n_eval=1)
    model = M.tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = HiggsAudioTrainer(model=model, args=targs(tmp_path), train_dataset=train, data_collator=bad_collate(fault),
                           startup_validation="off")
    with pytest.raises(BatchValidationError, match=field) as err:
        tr.train()
    assert kind in {i.kind for i in err.value.issues} and "step 1" in str(err.value)
    assert tr.state.global_step == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the start-up probe batch catches the same fault before the trainer even exists
    with pytest.raises(StartupValidationError, match=field):
        HiggsAudioTrainer(model=M.tiny_model(), args=targs(tmp_path), train_dataset=train,
                          data_collator=bad_collate(fault))


def test_warn_mode_logs_once_counts_and_never_logs_a_fake_audio_loss(tmp_path, caplog):
    calls = {"n": 0}

    def every_other_masked(samples):
        b = M.collate(samples)
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            _all_masked(b)
        return b

    train, _ = M.data(n_train=64, n_eval=1)
    tr = HiggsAudioTrainer(model=M.tiny_model(), args=targs(tmp_path, max_steps=8), train_dataset=train,
                           data_collator=every_other_masked, batch_validation="warn", startup_validation="off")
    with caplog.at_level(logging.WARNING, logger="higgs_diag.trainer"):
        tr.train()
    entries = [e for e in tr.state.log_history if "loss" in e]
    masked = [e for e in entries if e["n_batches_no_audio_targets"] == 1]
    assert len(masked) == 4 and tr.batch_issue_counts["all-audio-masked"] == 4
    for e in masked:  # no audio target: no audio_loss key at all (not 0.0, not NaN), the count says why
        assert e["n_audio_targets"] == 0 and not any(k.startswith("audio_loss") for k in e)
        assert math.isfinite(e["text_loss"])
    assert all("audio_loss" in e for e in entries if e not in masked)
    assert sum("every audio label is -100" in r.getMessage() for r in caplog.records) == 1  # once per kind


def test_a_batch_without_any_target_raises_instead_of_inventing_a_loss(tmp_path):
    def nothing_to_learn(samples):
        b = M.collate(samples)
        b["label_ids"] = torch.full_like(b["label_ids"], -100)
        _all_masked(b)
        return b

    train, _ = M.data(n_train=16, n_eval=1)
    tr = HiggsAudioTrainer(model=M.tiny_model(), args=targs(tmp_path), train_dataset=train,
                           data_collator=nothing_to_learn, batch_validation="warn", startup_validation="off")
    with pytest.raises(ValueError, match="no valid target"):
        tr.train()
