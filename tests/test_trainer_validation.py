"""Start-up validation (shared with analyze's HD601), the collator guard with boson's real collator, the presets,
and the migration in docs/trainer.md run as written."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from transformers import TrainingArguments

import higgs_diag
from higgs_diag.checks import REGISTRY, load_all
from higgs_diag.checks.config_checks import RECOMMENDED, validate_args
from higgs_diag.config import Thresholds
from higgs_diag.diagnosis import Severity
from higgs_diag.trainer import (HiggsAudioTrainer, StartupValidationError, guard_collator, presets,
                                validate_training_args)
from higgs_diag.batch import BatchValidationError

from _trainer_util import ROOT, CachedDataset, M, boson_collator, chatml_samples, targs


# ---- start-up validation -----------------------------------------------------------------------------------
def _trainer(tmp_path, collator=None, train=None, **kw):
    args = kw.pop("args", None) or targs(tmp_path)
    return HiggsAudioTrainer(model=M.tiny_model(), args=args, data_collator=collator or boson_collator(),
                             train_dataset=train if train is not None else chatml_samples(8, 3), **kw)


@pytest.mark.parametrize("collator_kw, needle", [
    (dict(use_delay_pattern=False), "use_delay_pattern=False but model.config.use_delay_pattern=True"),
    (dict(audio_num_codebooks=3), "audio_num_codebooks=3 but model.config.audio_num_codebooks=4"),
    (dict(audio_stream_bos_id=1024), "audio_stream_bos_id=1024"),
])
def test_collator_contradicting_the_model_config_stops_at_startup(tmp_path, collator_kw, needle):
    with pytest.raises(StartupValidationError) as err:
        _trainer(tmp_path, boson_collator(**collator_kw))
    assert needle in str(err.value)


def test_remove_unused_columns_on_dict_samples_stops_at_startup(tmp_path):
    train, _ = M.data(n_train=8, n_eval=1)
    with pytest.raises(StartupValidationError, match=r"remove_unused_columns=True drops the sample keys \['audio_codes'\]"):
        _trainer(tmp_path, M.collate, train, args=targs(tmp_path, remove_unused_columns=True))
    # boson's ChatMLDatasetSample objects are not filtered by HF: the same flag is safe there
    tr = _trainer(tmp_path, args=targs(tmp_path, remove_unused_columns=True))
    assert not [p for p in tr.startup_problems if p.severity == "critical"]


def test_best_model_metric_must_be_produced_and_save_steps_a_multiple(tmp_path):
    evald = chatml_samples(4, 4)
    best = dict(eval_strategy="steps", eval_steps=5, save_strategy="steps", save_steps=10, load_best_model_at_end=True)
    with pytest.raises(StartupValidationError, match="metric_for_best_model='bleu' is not a metric the evaluation"):
        _trainer(tmp_path, args=targs(tmp_path, metric_for_best_model="bleu", **best), eval_dataset=evald)
    for ok in ("eval_loss", "audio_loss", "eval_audio_loss_cb3"):  # what the trainer produces passes
        _trainer(tmp_path, args=targs(tmp_path, metric_for_best_model=ok, **best), eval_dataset=evald)
    args = targs(tmp_path, metric_for_best_model="eval_loss", **best)
    args.save_steps = 7  # set after construction (TrainingArguments checks it only in __post_init__)
    with pytest.raises(StartupValidationError, match="save_steps=7 not a multiple of eval_steps=5"):
        _trainer(tmp_path, args=args, eval_dataset=evald)


def test_warnings_for_nan_filter_and_learning_rate_with_arabic_advice(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="higgs_diag.trainer"):
        tr = _trainer(tmp_path, args=targs(tmp_path, learning_rate=1e-4, warmup_steps=100, logging_nan_inf_filter=True),
                      language="ar")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "logging_nan_inf_filter=True" in text
    assert "learning_rate=0.0001 is outside the recommended range 1e-05..3e-05 for Arabic" in text
    assert "warmup_steps=100 for an Arabic run: seed 000 recommends 500..1000" in text
    assert {p.severity for p in tr.startup_problems} == {"warning"}  # warnings do not stop the run
    # without a language the general range applies (Thresholds.lr_recommended_min/max): 1e-4 is fine
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="higgs_diag.trainer"):
        _trainer(tmp_path, args=targs(tmp_path, learning_rate=1e-4))
    assert not any("learning_rate" in r.getMessage() for r in caplog.records)


def test_warn_mode_reports_without_raising(tmp_path):
    problems = validate_training_args(targs(tmp_path), M.tiny_model(), boson_collator(use_delay_pattern=False),
                                      chatml_samples(4, 3), mode="warn")
    kinds = [p.message for p in problems if p.severity == "critical"]
    assert any("use_delay_pattern" in m for m in kinds)
    assert any(m.startswith("first training batch") and "delay pattern" in m for m in kinds)  # the probe batch too


def test_analyze_reports_greater_is_better_for_a_loss_metric(tmp_path):
    """New in HD601 (shared with the trainer): keeping the checkpoint with the *highest* eval_loss."""
    load_all()
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"global_step": 2, "max_steps": 2, "logging_steps": 1,
                             "log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]}))
    run = higgs_diag.load_run(p)
    base = dict(load_best_model_at_end=True, metric_for_best_model="eval_loss", eval_strategy="steps",
                save_strategy="steps", eval_steps=5, save_steps=10)
    run.args = dict(base, greater_is_better=True)
    found = list(REGISTRY["HD601"].func(run, Thresholds()))
    assert [f.severity for f in found] == [Severity.CRITICAL]
    assert "greater_is_better=True" in found[0].title and "greater_is_better=False" in found[0].fix
    run.args = dict(base, greater_is_better=False)
    assert list(REGISTRY["HD601"].func(run, Thresholds())) == []
    # analyze never gets the start-up advice (it judges logged values instead)
    assert validate_args({"learning_rate": 1.0, "logging_nan_inf_filter": True}) == []


# ---- collator guard with boson's real collator ------------------------------------------------------------
def test_boson_collator_mutates_cached_samples_and_the_guard_prevents_it():
    collate = boson_collator()
    samples = chatml_samples(4, 5)
    first = collate(samples).label_audio_ids
    assert int((first != -100).sum()) > 0
    assert int((collate(samples).label_audio_ids != -100).sum()) == 0  # the bug: every audio label gone

    samples = chatml_samples(4, 5)
    labels_before = [s.label_ids.clone() for s in samples]
    guarded = guard_collator(collate)
    a, b = guarded(samples), guarded(samples)
    assert torch.equal(a.label_audio_ids, first) and torch.equal(b.label_audio_ids, first)
    assert all(torch.equal(s.label_ids, l) for s, l in zip(samples, labels_before))
    assert guarded.use_delay_pattern is True  # settings stay readable through the guard


def test_trainer_trains_on_cached_samples_with_boson_collator(tmp_path):
    """3 epochs over the same ChatMLDatasetSample objects: guarded, every step keeps its audio targets;
    unguarded, the second epoch's first batch has none and strict validation stops the run."""
    args = targs(tmp_path, max_steps=6)
    tr = HiggsAudioTrainer(model=M.tiny_model(), args=args, train_dataset=CachedDataset(chatml_samples(8, 6)),
                           data_collator=boson_collator())
    tr.train()
    entries = [e for e in tr.state.log_history if "loss" in e]
    assert len(entries) == 6 and all(e["n_audio_targets"] > 0 and "audio_loss" in e for e in entries)

    tr = HiggsAudioTrainer(model=M.tiny_model(), args=targs(tmp_path, max_steps=6),
                           train_dataset=CachedDataset(chatml_samples(8, 6)), data_collator=boson_collator(),
                           guard_collator=False)
    with pytest.raises(BatchValidationError, match="step 3.*label_audio_ids: every audio label is -100"):
        tr.train()


# ---- presets -----------------------------------------------------------------------------------------------
def test_presets_are_seed_000_values_and_pass_validation(tmp_path):
    for name, row in (("zero-shot-voice-cloning", "default"), ("arabic-voice-cloning", "arabic")):
        p = presets.preset(name)
        lo, hi = RECOMMENDED[row]["learning_rate"]
        assert lo <= p["learning_rate"] <= hi
        wlo, whi = RECOMMENDED[row]["warmup_steps"]
        assert wlo <= p["warmup_steps"] <= whi and p["save_steps"] % p["eval_steps"] == 0
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=20_000, use_cpu=True, **p)
        problems = validate_training_args(args, mode="strict", language="ar" if row == "arabic" else None,
                                          produced_metrics={"eval_loss"})
        assert problems == []
    assert presets.LORA == dict(r=16, alpha=32, dropout=0.1)
    with pytest.raises(ValueError, match="unknown preset"):
        presets.preset("nope")


# ---- docs/trainer.md: the migration, executed as written -------------------------------------------------------
def test_migration_in_docs_runs_as_written(tmp_path):
    text = (ROOT / "docs" / "trainer.md").read_text()
    block = re.search(r"<!-- migration: after -->\s*```python\n(.*?)```", text, re.S).group(1)
    ns = dict(model=M.tiny_model(), train_dataset=chatml_samples(8, 7), eval_dataset=chatml_samples(4, 8),
              collator=boson_collator(), output_dir=str(tmp_path / "out"), max_steps=4)
    exec(compile(block, "docs/trainer.md", "exec"), ns)
    ckpt = tmp_path / "out" / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    trainer = ns["trainer"]
    assert isinstance(trainer, HiggsAudioTrainer) and trainer.state.global_step == 4
    assert trainer.last_step.audio_loss is not None and trainer.last_step.n_audio_targets > 0
    assert trainer.args.logging_nan_inf_filter is False and trainer.args.label_names == ["label_ids", "label_audio_ids"]
