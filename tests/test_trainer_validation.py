"""Start-up validation (shared with analyze's HD601-HD605), the collator guard with boson's real collator, the presets,
and the migration in docs/trainer.md run as written."""
from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from transformers import TrainingArguments

import higgs_diag
from higgs_diag.checks import REGISTRY, load_all, run_checks
from higgs_diag.checks.config_checks import RECOMMENDED, StartupArgs, validate_args
from higgs_diag.config import Selection, Thresholds
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


def _run_with_args(tmp_path, args, name="trainer_state.json", **series):
    """A short run (loss, optionally grad_norm) whose logged TrainingArguments are ``args``."""
    n = len(next(iter(series.values()))) if series else 2
    loss = series.pop("loss", [2.0 - 0.1 * i for i in range(n)])
    hist = [{"step": i + 1, "loss": loss[i], **{k: v[i] for k, v in series.items()}} for i in range(n)]
    p = tmp_path / name
    p.write_text(json.dumps({"global_step": n, "max_steps": n, "logging_steps": 1, "log_history": hist}))
    run = higgs_diag.load_run(p)
    run.args = args
    return run


def _rule(code, run):
    """One rule's findings as a report shows them (through the registry: explanation and fix filled in)."""
    return run_checks(run, Thresholds(), Selection(select=(code,)))


# seed 000's evaluation settings (eval_steps 500, save_steps 1000, best model by eval_loss): no rule fires
HEALTHY_ARGS = dict(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                    eval_strategy="steps", save_strategy="steps", eval_steps=500, save_steps=1000, max_steps=20_000,
                    logging_nan_inf_filter=False, learning_rate=5e-5, warmup_steps=200)
ARGS_CODES = ("HD601", "HD602", "HD603", "HD604", "HD605", "HD607")


@pytest.mark.parametrize("code, changes, needle", [
    ("HD601", dict(save_steps=700), "save_steps=700 not a multiple of eval_steps=500"),
    ("HD602", dict(eval_strategy="epoch"), "eval_strategy='epoch' and save_strategy='steps'"),
    ("HD603", dict(eval_strategy="no", load_best_model_at_end=False), "but evaluation is off"),
    ("HD604", dict(max_steps=400, load_best_model_at_end=False), "eval_steps=500 is larger than max_steps=400"),
    ("HD605", dict(greater_is_better=True), "the checkpoint with the highest loss is kept"),
])
def test_each_args_contradiction_has_its_own_code(tmp_path, code, changes, needle):
    """Analyze (on the logged args) and the trainer (validate_args) report the same condition under the
    same code; the other contradiction rules stay quiet, and all are quiet on seed 000's settings."""
    load_all()
    run = _run_with_args(tmp_path, dict(HEALTHY_ARGS, **changes))
    found = [f for c in ARGS_CODES for f in _rule(c, run)]
    assert [f.code for f in found] == [code], [(f.code, f.title) for f in found]
    f = found[0]
    assert needle in f.title and f.explanation == REGISTRY[code].why and f.fix.startswith(REGISTRY[code].fix)
    assert [(c, t) for c, _s, t, _f in validate_args(run.args)] == [(code, f.title)]
    healthy = _run_with_args(tmp_path, dict(HEALTHY_ARGS), name="b.json")
    assert [f for c in ARGS_CODES for f in _rule(c, healthy)] == []
    assert validate_args(HEALTHY_ARGS, at_startup=True, produced_metrics={"eval_loss"}) == []


def test_analyze_reports_greater_is_better_for_a_loss_metric(tmp_path):
    """HD605 (shared with the trainer): keeping the checkpoint with the *highest* eval_loss."""
    load_all()
    base = dict(load_best_model_at_end=True, metric_for_best_model="eval_loss", eval_strategy="steps",
                save_strategy="steps", eval_steps=5, save_steps=10)
    run = _run_with_args(tmp_path, dict(base, greater_is_better=True))
    found = _rule("HD605", run)
    assert [f.severity for f in found] == [Severity.CRITICAL]
    assert "greater_is_better=True" in found[0].title and "greater_is_better=False" in found[0].fix
    run.args = dict(base, greater_is_better=False)
    assert _rule("HD605", run) == []
    # analyze never gets the start-up advice (it judges logged values instead)
    assert validate_args({"learning_rate": 1.0, "logging_nan_inf_filter": True}) == []


def test_save_steps_fix_names_a_multiple(tmp_path):
    load_all()
    run = _run_with_args(tmp_path, dict(HEALTHY_ARGS, save_steps=1300))
    (f,) = _rule("HD601", run)
    assert f.severity == Severity.CRITICAL and f.fix.endswith("Here: eval_steps=500, save_steps=1500.")


def test_nan_filter_that_hid_non_finite_gradients(tmp_path):
    """HD607: grad_norm NaN at 2+ steps while every logged loss is finite and the filter is on."""
    load_all()
    grad = [1.0, math.nan, 1.0, math.inf, 1.0, 1.0]
    run = _run_with_args(tmp_path, {"logging_nan_inf_filter": True}, grad_norm=grad)
    (f,) = _rule("HD607", run)
    assert f.severity == Severity.WARNING and f.steps == (2, 4) and "logging_nan_inf_filter=False" in f.fix
    # the filter off, a single bad step, or the NaN visible in the loss: quiet
    assert _rule("HD607", _run_with_args(tmp_path, {"logging_nan_inf_filter": False}, name="b.json",
                                         grad_norm=grad)) == []
    assert _rule("HD607", _run_with_args(tmp_path, {}, name="c.json", grad_norm=[1.0, math.nan, 1.0, 1.0])) == []
    assert _rule("HD607", _run_with_args(tmp_path, {}, name="d.json", grad_norm=grad,
                                         loss=[2.0, math.nan, 1.9, math.nan, 1.8, 1.7])) == []
    assert _rule("HD607", higgs_diag.load_run(ROOT / "fixtures" / "runs" / "healthy")) == []


def test_startup_rules_are_documented_and_not_run_by_analyze(tmp_path):
    """HD606, HD608-HD610 have codes and docs, the trainer applies them, analyze does not."""
    load_all()
    startup = {c for c, r in REGISTRY.items() if r.scope == "startup"}
    assert {"HD606", "HD608", "HD609", "HD610"} <= startup
    args = dict(HEALTHY_ARGS, logging_nan_inf_filter=True, learning_rate=1e-2, warmup_steps=10,
                metric_for_best_model="bleu")
    got = validate_args(args, at_startup=True, produced_metrics={"eval_loss"}, language="ar")
    assert [c for c, *_ in got] == ["HD606", "HD608", "HD609", "HD610"]
    assert all(fix.startswith(REGISTRY[c].fix) for c, _s, _t, fix in got)
    # the registered rules judge the same conditions on what the trainer knows
    subject = StartupArgs(args, frozenset({"eval_loss"}), "ar")
    for code, _sev, title, _fix in got:
        assert [f.title for f in REGISTRY[code].func(subject, Thresholds())] == [title]
    healthy = StartupArgs(dict(HEALTHY_ARGS, warmup_steps=600, learning_rate=2e-5), frozenset({"eval_loss"}), "ar")
    assert [f for c in sorted(startup) for f in REGISTRY[c].func(healthy, Thresholds())] == []
    run = _run_with_args(tmp_path, args)
    assert not startup & {f.code for f in run_checks(run)}


def test_trainer_problems_carry_their_codes(tmp_path):
    problems = validate_training_args(targs(tmp_path, learning_rate=1e-4, warmup_steps=100, logging_nan_inf_filter=True),
                                      mode="warn", language="ar", probe_batch=False)
    assert sorted(p.message.split()[0] for p in problems) == ["HD608", "HD609", "HD610"]
    assert all(p.severity == "warning" and p.fix for p in problems)


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
