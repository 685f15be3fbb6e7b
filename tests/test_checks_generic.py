"""The generic checks (numerics HD301/HD302, optimisation HD401-HD405, schedule HD501-HD508, resume HD701):
logic on small hand-built runs, calibration on the real corpus, and the fixture training runs."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import higgs_diag
from higgs_diag.checks import REGISTRY, load_all, run_checks
from higgs_diag.checks._util import is_higgs_run, loss_not_cross_entropy
from higgs_diag.config import Selection, Thresholds
from higgs_diag.diagnosis import Severity
from higgs_diag.run.discover import RunReadError
from higgs_diag.run.model import Run, SCALAR_COLUMNS, TrainerStateInfo

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "trainer_state"
RUNS = ROOT / "fixtures" / "runs"
MY_CODES = ("HD301", "HD302", "HD303", "HD304", "HD305", "HD306", "HD401", "HD402", "HD403", "HD404", "HD405",
            "HD406", "HD407", "HD408", "HD409", "HD410", "HD703", "HD704", "HD705", "HD501", "HD502", "HD503", "HD504", "HD505",
            "HD506", "HD507", "HD701")
T = Thresholds()

load_all()


# ---- building runs -----------------------------------------------------------------------------------

def history(steps, **series):
    """log_history training entries: one per step, each series a list (None = key absent)."""
    out = []
    for i, s in enumerate(steps):
        e = {"step": int(s), "epoch": round(float(s) / max(steps[-1], 1), 4)}
        for k, vals in series.items():
            v = vals[i]
            if v is not None:
                e[k] = float(v)
        out.append(e)
    return out


def make_run(tmp_path, entries, *, args=None, model_config=None, name="trainer_state.json", **state):
    """A Run read by the real loader from a trainer_state.json (args/model_config set as the TensorBoard
    text summaries would)."""
    data = {"global_step": state.pop("global_step", max((e.get("step", 0) for e in entries), default=0)),
            "max_steps": state.pop("max_steps", max((e.get("step", 0) for e in entries), default=0)),
            "logging_steps": state.pop("logging_steps", 1), "log_history": entries, **state}
    p = tmp_path / name
    p.write_text(json.dumps(data))
    run = higgs_diag.load_run(p)
    run.args = args
    run.model_config = model_config
    return run


def scalars_run(rows, **kw):
    """A Run from raw scalar rows (step, metric, value[, file, segment])."""
    recs = []
    for r in rows:
        step, metric, value = r[:3]
        file = r[3] if len(r) > 3 else "events.out.tfevents.1"
        seg = r[4] if len(r) > 4 else 0
        recs.append({"step": step, "metric": metric, "value": float(value), "source": "tensorboard",
                     "wall_time": np.nan, "file": file, "segment": seg})
    df = pd.DataFrame(recs, columns=SCALAR_COLUMNS)
    return Run(root="mem", scalars=df.astype({"step": "int64", "segment": "int64", "value": "float64"}), **kw)


def check(code, run, t=T):
    """The findings of one rule as a report shows them: through the registry, which fills in the code and
    the rule's explanation and fix (the rule function alone yields only title and evidence)."""
    return run_checks(run, t, Selection(select=(code,)))


def one(code, run, t=T):
    fs = check(code, run, t)
    assert len(fs) == 1, [(f.severity, f.title) for f in fs]
    f = fs[0]
    assert f.title and f.evidence and f.explanation and f.fix
    return f


def decaying(n, start=3.0, end=1.0, noise=0.0, seed=0):
    rng = np.random.RandomState(seed)
    x = np.linspace(0, 1, n)
    return list(end + (start - end) * np.exp(-4 * x) + noise * rng.randn(n))


# ---- the registry and the docs -----------------------------------------------------------------------

def test_codes_registered_with_documented_sections():
    for code in MY_CODES:
        c = REGISTRY[code]
        assert c.scope == "generic"
        for section in ("What it detects:", "Why it happens:", "Example:", "Fix:"):
            assert section in c.doc, f"{code} docstring lacks {section}"
        assert c.summary and not c.summary.endswith(":")


def test_checks_do_not_import_torch_or_transformers():
    for mod in ("numerics", "optimisation", "gradients", "overfitting", "schedule", "resume", "_util"):
        for line in (ROOT / "higgs_diag" / "checks" / f"{mod}.py").read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]):
                assert not words[1].split(".")[0] in ("torch", "transformers", "peft"), (mod, line)


def test_new_thresholds_are_named_and_overridable():
    t = Thresholds().with_overrides({"loss-jump-min-rise": "0.5", "lr_zero_min_points": "7"})
    assert t.loss_jump_min_rise == 0.5 and t.lr_zero_min_points == 7


# ---- HD301 non-finite --------------------------------------------------------------------------------

def test_nan_loss_is_critical_with_first_step_and_count(tmp_path):
    steps = list(range(1, 101))
    loss = decaying(100)
    loss[59:] = [math.nan] * 41
    grad = [1.0] * 59 + [math.nan] * 41
    run = make_run(tmp_path, history(steps, loss=loss, grad_norm=grad, learning_rate=[1e-4] * 100))
    f = one("HD301", run)
    assert check("HD305", run) == []  # the NaN grad_norm is part of HD301's finding
    assert f.severity == Severity.CRITICAL
    assert f.steps == (60, 100)
    assert "loss" in f.metrics and "grad_norm" in f.metrics
    assert any("41 of 100" in e and "first step 60" in e for e in f.evidence)
    assert any("last finite value" in e for e in f.evidence)


def test_nan_eval_loss_and_audio_loss_are_critical(tmp_path):
    steps = list(range(1, 21))
    h = history(steps, loss=decaying(20), grad_norm=[1.0] * 20, audio_loss=[4.0] * 10 + [math.inf] + [4.0] * 9)
    h.append({"step": 20, "eval_loss": math.nan, "eval_runtime": 1.0})
    f = one("HD301", make_run(tmp_path, h))
    assert f.severity == Severity.CRITICAL
    assert set(f.metrics) >= {"audio_loss", "eval_loss"}


def test_lone_inf_grad_norm_is_info(tmp_path):
    steps = list(range(1, 101))
    grad = [0.5] * 100
    grad[3] = math.inf
    run = make_run(tmp_path, history(steps, loss=decaying(100), grad_norm=grad))
    f = one("HD306", run)
    assert f.severity == Severity.INFO
    assert f.steps == (4, 4) and f.metrics == ("grad_norm",)
    assert "scaler" in f.title
    assert check("HD301", run) == [] and check("HD305", run) == []


def test_isolated_nan_grad_norm_with_finite_loss_is_warning(tmp_path):
    steps = list(range(1, 101))
    grad = [0.5] * 100
    grad[20] = grad[70] = math.nan
    run = make_run(tmp_path, history(steps, loss=decaying(100), grad_norm=grad))
    f = one("HD305", run)
    assert f.severity == Severity.WARNING
    assert any("NaN at 2 of 100" in e for e in f.evidence)
    assert check("HD301", run) == [] and check("HD306", run) == []


def test_nan_grad_norm_on_many_steps_is_critical(tmp_path):
    steps = list(range(1, 101))
    grad = [0.5 if i % 5 else math.nan for i in range(100)]  # 20%
    f = one("HD305", make_run(tmp_path, history(steps, loss=decaying(100), grad_norm=grad)))
    assert f.severity == Severity.CRITICAL


def test_finite_run_has_no_non_finite_finding(tmp_path):
    steps = list(range(1, 51))
    run = make_run(tmp_path, history(steps, loss=decaying(50), grad_norm=[1.0] * 50))
    assert [f for code in ("HD301", "HD305", "HD306") for f in check(code, run)] == []


# ---- HD302 nan-masked --------------------------------------------------------------------------------

def test_nan_from_first_step_logged_as_zero_is_masked(tmp_path):
    steps = list(range(1, 41))
    run = make_run(tmp_path, history(steps, loss=[0.0] * 40, grad_norm=[math.nan] * 40, learning_rate=[1e-4] * 40),
                   args={"logging_nan_inf_filter": True})
    f = one("HD302", run)
    assert f.severity == Severity.CRITICAL
    assert f.steps == (1, 40)
    assert any("exactly 0.0" in e for e in f.evidence)
    assert any("logging_nan_inf_filter = True" in e for e in f.evidence)
    # HD301 leaves the grad_norm it explains to HD302
    assert check("HD301", run) == []
    # and no-learning / plateau are not raised on the masked loss (or point at HD302)
    found = run_checks(run)
    for x in found:
        if x.code in ("HD401", "HD406", "HD404", "HD409"):
            assert x.caused_by == "HD302"


def test_masked_nan_with_nan_audio_loss_is_explained_by_hd301(tmp_path):
    steps = list(range(1, 31))
    loss = decaying(10) + [0.0] * 20
    grad = [1.0] * 10 + [math.nan] * 20
    audio = [5.0] * 10 + [math.nan] * 20
    run = make_run(tmp_path, history(steps, loss=loss, grad_norm=grad, audio_loss=audio))
    found = {f.code: f for f in run_checks(run)}
    # the NaN (visible in audio_loss) explains the masked loss
    assert found["HD301"].severity == Severity.CRITICAL and found["HD301"].caused_by is None
    assert found["HD302"].severity == Severity.CRITICAL and found["HD302"].caused_by == "HD301"
    assert "audio_loss" in found["HD301"].metrics


def test_fp16_window_masked_once_then_recovers_is_warning(tmp_path):
    steps = list(range(10, 1010, 10))
    loss = decaying(100)
    grad = [1.0] * 100
    loss[30], grad[30] = 0.0, math.nan
    f = one("HD302", make_run(tmp_path, history(steps, loss=loss, grad_norm=grad)))
    assert f.severity == Severity.WARNING
    assert f.steps == (310, 310)


def test_frozen_loss_on_nan_grad_steps_is_masked(tmp_path):
    steps = list(range(1, 51))
    loss = decaying(30) + [None] * 20
    frozen = loss[29]
    loss[30:] = [frozen] * 20
    grad = [1.0] * 30 + [math.nan] * 20
    run = make_run(tmp_path, history(steps, loss=loss, grad_norm=grad))
    f = one("HD303", run)
    assert f.severity == Severity.CRITICAL
    assert f.steps == (31, 50)
    assert any("repeats the previous value" in e for e in f.evidence)
    assert check("HD302", run) == [] and check("HD305", run) == []  # no 0.0; the NaN points are HD303's


def test_loss_pinned_to_suspicious_constant_with_zero_grad(tmp_path):
    steps = list(range(1, 101))
    loss = decaying(100)
    grad = [1.0] * 100
    loss[40:70] = [0.001] * 30
    grad[40:70] = [0.0] * 30
    f = one("HD304", make_run(tmp_path, history(steps, loss=loss, grad_norm=grad)))
    assert f.severity == Severity.CRITICAL  # 30% of the steps
    assert f.steps == (41, 70)
    assert "0.001" in f.title


def test_constant_fallback_for_the_whole_run_explains_no_learning(tmp_path):
    steps = list(range(1, 51))
    run = make_run(tmp_path, history(steps, loss=[0.001] * 50, grad_norm=[0.0] * 50, learning_rate=[1e-4] * 50))
    found = {f.code: f for f in run_checks(run)}
    assert found["HD304"].severity == Severity.CRITICAL
    assert found["HD401"].severity == Severity.CRITICAL and found["HD401"].caused_by == "HD304"


def test_isolated_zero_loss_zero_grad_steps_are_info(tmp_path):
    steps = list(range(10, 3010, 10))
    loss = decaying(300, noise=0.02)
    grad = [1.0] * 300
    for i in (31, 114, 226, 279):
        loss[i], grad[i] = 0.0, 0.0
    f = one("HD304", make_run(tmp_path, history(steps, loss=loss, grad_norm=grad)))
    assert f.severity == Severity.INFO


def test_converged_loss_rounded_to_zero_is_not_masked(tmp_path):
    steps = list(range(10, 1510, 10))
    loss = decaying(60, 0.7, 0.01) + [0.0] * 90
    grad = list(np.linspace(6, 0.01, 60)) + [0.0007] * 90
    run = make_run(tmp_path, history(steps, loss=loss, grad_norm=grad))
    assert [f for code in ("HD302", "HD303", "HD304") for f in check(code, run)] == []


def test_preference_objective_at_zero_is_not_a_fallback(tmp_path):
    steps = list(range(1, 21))
    run = make_run(tmp_path, history(steps, loss=[0.0] * 20, grad_norm=[0.0] * 20, kl=[0.0] * 20,
                                     reward=[0.5] * 20))
    assert loss_not_cross_entropy(run)
    assert check("HD302", run) == [] and check("HD304", run) == []


# ---- HD401 no-learning --------------------------------------------------------------------------------

def test_zero_grad_norm_everywhere_is_critical(tmp_path):
    steps = list(range(1, 101))
    f = one("HD401", make_run(tmp_path, history(steps, loss=decaying(100, 7.0, 6.9, noise=0.05), grad_norm=[0.0] * 100,
                                                learning_rate=[2e-4] * 100)))
    assert f.severity == Severity.CRITICAL
    assert f.steps == (1, 100)
    assert any("100 of 100" in e for e in f.evidence)
    assert "backward" in f.fix


def test_zero_grad_share_threshold_edges(tmp_path):
    steps = list(range(1, 101))
    grad = [0.0] * 90 + [0.3] * 10
    run = make_run(tmp_path, history(steps, loss=decaying(100), grad_norm=grad))
    assert one("HD401", run).severity == Severity.CRITICAL  # exactly 90%
    assert check("HD401", run, T.replace(zero_grad_share=0.95)) == []
    grad = [0.0] * 89 + [0.3] * 11
    run = make_run(tmp_path, history(steps, loss=decaying(100), grad_norm=grad), name="b.json")
    assert check("HD401", run) == []


def test_identical_loss_with_nonzero_grad_is_warning(tmp_path):
    steps = list(range(1, 31))
    run = make_run(tmp_path, history(steps, loss=[2.3026] * 30, grad_norm=[0.8] * 30))
    f = one("HD406", run)
    assert f.severity == Severity.WARNING
    assert "identical" in f.title
    assert check("HD401", run) == []


def test_flat_loss_relative_range_edges(tmp_path):
    steps = list(range(1, 31))
    base = 5.0
    tiny = [base + 0.0005 * base * math.sin(i) for i in range(30)]   # range ~1e-3 of the value
    run = make_run(tmp_path, history(steps, loss=tiny, grad_norm=[0.8] * 30))
    assert one("HD406", run).severity == Severity.WARNING
    wider = [base + 0.002 * base * math.sin(i) for i in range(30)]
    assert check("HD406", make_run(tmp_path, history(steps, loss=wider, grad_norm=[0.8] * 30), name="b.json")) == []


def test_learning_run_and_short_runs_are_not_no_learning(tmp_path):
    steps = list(range(1, 101))
    learning = make_run(tmp_path, history(steps, loss=decaying(100), grad_norm=[0.5] * 100))
    short = make_run(tmp_path, history([1, 2, 3], loss=[1.0] * 3, grad_norm=[0.0] * 3), name="b.json")
    for run in (learning, short):
        assert check("HD401", run) == [] and check("HD406", run) == []


def test_zero_learning_rate_explains_flat_loss(tmp_path):
    steps = list(range(1, 41))
    run = make_run(tmp_path, history(steps, loss=[3.1] * 40, grad_norm=[0.7] * 40, learning_rate=[0.0] * 40))
    found = {f.code: f for f in run_checks(run)}
    assert found["HD501"].severity == Severity.CRITICAL
    assert found["HD406"].caused_by == "HD501"


# ---- HD402 loss-divergence ----------------------------------------------------------------------------

def test_divergence_that_does_not_recover(tmp_path):
    steps = list(range(1, 201))
    loss = decaying(100, 3.0, 1.0) + list(np.linspace(1.0, 2.6, 50)) + [2.6] * 50
    f = one("HD402", make_run(tmp_path, history(steps, loss=loss, grad_norm=[1.0] * 200,
                                                learning_rate=[5e-4] * 200)))
    assert f.severity == Severity.WARNING
    assert f.steps[1] == 200 and 90 <= f.steps[0] <= 110
    assert any("learning_rate" in e for e in f.evidence)


def test_spike_that_recovers_is_not_divergence(tmp_path):
    steps = list(range(1, 201))
    loss = decaying(200, 3.0, 1.0)
    for i in range(120, 126):
        loss[i] = 4.0
    assert check("HD402", make_run(tmp_path, history(steps, loss=loss))) == []


def test_divergence_factor_edges(tmp_path):
    steps = list(range(1, 101))
    for end, expected in ((1.45, 0), (1.6, 1)):
        loss = decaying(60, 3.0, 1.0) + [end] * 40
        run = make_run(tmp_path, history(steps, loss=loss), name=f"{end}.json")
        assert len(check("HD402", run)) == expected, end


def test_small_absolute_rise_of_a_near_zero_loss_is_not_divergence(tmp_path):
    steps = list(range(1, 101))
    loss = decaying(60, 0.5, 0.01) + [0.04] * 40
    assert check("HD402", make_run(tmp_path, history(steps, loss=loss))) == []


def test_preference_losses_are_never_divergence(tmp_path):
    steps = list(range(1, 101))
    rising = list(np.linspace(-0.2, 0.9, 100))  # negative values: not a cross-entropy
    assert check("HD402", make_run(tmp_path, history(steps, loss=rising))) == []
    dpo = decaying(50, 0.69, 0.3) + [0.9] * 50
    run = make_run(tmp_path, history(steps, loss=dpo, **{"rewards/chosen": [0.1] * 100}), name="dpo.json")
    assert "preference" in loss_not_cross_entropy(run)
    assert check("HD402", run) == []


# ---- HD403 grad-explosion ------------------------------------------------------------------------------

def _noisy(n, level, seed=1, rel=0.1):
    rng = np.random.RandomState(seed)
    return list(level * (1 + rel * rng.randn(n)))


def test_isolated_spike_absorbed_is_info_and_no_absolute_bound(tmp_path):
    steps = list(range(1, 301))
    grad = _noisy(300, 2e5)  # a real Higgs run's scale: no alarm by itself
    run = make_run(tmp_path, history(steps, loss=decaying(300), grad_norm=grad))
    assert check("HD403", run) == [] and check("HD407", run) == []
    grad[150] = 5e6
    run = make_run(tmp_path, history(steps, loss=decaying(300), grad_norm=grad), name="b.json")
    f = one("HD407", run)
    assert check("HD403", run) == []
    assert f.severity == Severity.INFO
    assert f.steps == (151, 151)
    assert any("step 151" in e for e in f.evidence)


def test_spike_followed_by_lasting_loss_jump_is_warning(tmp_path):
    steps = list(range(1, 301))
    grad = _noisy(300, 0.4)
    loss = decaying(300, 3.0, 1.0)
    grad[150] = 40.0
    for i in range(150, 160):
        loss[i] = 2.5
    run = make_run(tmp_path, history(steps, loss=loss, grad_norm=grad))
    f = one("HD403", run)
    assert f.severity == Severity.WARNING
    assert "loss jumps" in f.title or any("jumps" in e for e in f.evidence)
    assert check("HD407", run) == []


def test_single_noisy_batch_after_spike_is_not_a_loss_jump(tmp_path):
    steps = list(range(1, 301))
    grad = _noisy(300, 0.4)
    loss = decaying(300, 3.0, 1.0)
    grad[150] = 40.0
    loss[150] = 2.5  # only that batch
    run = make_run(tmp_path, history(steps, loss=loss, grad_norm=grad))
    assert one("HD407", run).severity == Severity.INFO
    assert check("HD403", run) == []


def test_spikes_with_clipping_disabled_are_warning(tmp_path):
    steps = list(range(1, 301))
    grad = _noisy(300, 0.4)
    grad[100] = 40.0
    run = make_run(tmp_path, history(steps, loss=decaying(300), grad_norm=grad), args={"max_grad_norm": 0.0})
    f = one("HD408", run)
    assert f.severity == Severity.WARNING and any("clipping disabled" in e for e in f.evidence)
    assert check("HD403", run) == []  # the loss did not jump (yet): the spike itself is HD407's info
    assert one("HD407", run).severity == Severity.INFO
    clipped = make_run(tmp_path, history(steps, loss=decaying(300), grad_norm=grad), args={"max_grad_norm": 1.0},
                       name="b.json")
    assert check("HD408", clipped) == []


def test_frequent_absorbed_spikes_stay_info(tmp_path):
    steps = list(range(1, 501))
    grad = _noisy(500, 0.01)
    for i in range(20, 500, 25):
        grad[i] = 5.0
    f = one("HD407", make_run(tmp_path, history(steps, loss=decaying(500, 0.7, 0.02), grad_norm=grad)))
    assert f.severity == Severity.INFO and "frequent" in f.title


def test_early_large_gradients_are_not_spikes(tmp_path):
    steps = list(range(1, 101))
    grad = [50.0, 20.0, 8.0] + _noisy(97, 0.5)
    run = make_run(tmp_path, history(steps, loss=decaying(100), grad_norm=grad), args={"max_grad_norm": 0.0})
    assert [f for code in ("HD403", "HD407", "HD408") for f in check(code, run)] == []


# ---- HD404 loss-plateau ------------------------------------------------------------------------------

def _plateau_loss(n=200, knee=100, level=1.2, seed=3):
    rng = np.random.RandomState(seed)
    head = list(np.linspace(3.0, level, knee))
    return head + list(level + 0.002 * rng.randn(n - knee))


def test_plateau_with_constant_lr_is_info(tmp_path):
    steps = list(range(1, 201))
    run = make_run(tmp_path, history(steps, loss=_plateau_loss(), grad_norm=[0.5] * 200,
                                     learning_rate=[1e-5 * min(1, s / 10) for s in steps]))
    f = one("HD404", run)
    assert f.severity == Severity.INFO
    assert f.steps[1] == 200
    assert check("HD409", run) == []


def test_no_improvement_since_warmup_is_warning(tmp_path):
    steps = list(range(1, 201))
    rng = np.random.RandomState(5)
    loss = list(6.9 + 0.01 * rng.randn(200))
    run = make_run(tmp_path, history(steps, loss=loss, grad_norm=[0.5] * 200, learning_rate=[1e-5] * 200))
    f = one("HD409", run)
    assert f.severity == Severity.WARNING and "not improved" in f.title
    assert check("HD404", run) == []


def test_plateau_at_the_end_of_a_decayed_schedule_is_expected(tmp_path):
    steps = list(range(1, 201))
    lr = [2e-5 * (1 - s / 200) for s in steps]
    run = make_run(tmp_path, history(steps, loss=_plateau_loss(), grad_norm=[0.5] * 200, learning_rate=lr))
    assert check("HD404", run) == [] and check("HD409", run) == []


def test_improving_loss_is_not_a_plateau(tmp_path):
    steps = list(range(1, 201))
    run = make_run(tmp_path, history(steps, loss=list(np.linspace(3, 1, 200)), grad_norm=[0.5] * 200,
                                     learning_rate=[1e-5] * 200))
    assert check("HD404", run) == [] and check("HD409", run) == []


# ---- HD405 overfitting --------------------------------------------------------------------------------

def _overfit_history(evals, train_end=0.2, every=100, **extra_eval):
    n = every * len(evals)
    steps = list(range(10, n + 1, 10))
    h = history(steps, loss=list(np.linspace(2.0, train_end, len(steps))), grad_norm=[1.0] * len(steps))
    for i, v in enumerate(evals):
        e = {"step": every * (i + 1), "eval_loss": v, "eval_runtime": 1.0}
        for k, vals in extra_eval.items():
            e[k] = vals[i]
        h.append(e)
    return h


def test_eval_loss_rising_while_train_falls_is_warning(tmp_path):
    run = make_run(tmp_path, _overfit_history([1.5, 1.2, 1.0, 1.08, 1.15, 1.25]),
                   best_metric=1.0, best_model_checkpoint="out/checkpoint-300")
    f = one("HD405", run)
    assert f.severity == Severity.WARNING
    assert f.steps == (300, 600)
    assert any("minimum 1 at step 300" in e for e in f.evidence)
    assert any("is the eval_loss minimum" in e for e in f.evidence)
    assert any("still falling" in e for e in f.evidence)


def test_overfit_min_evals_and_rise_fraction_edges(tmp_path):
    # minimum + 1 evaluation: too few with overfit_min_evals=3
    assert check("HD405", make_run(tmp_path, _overfit_history([1.5, 1.2, 1.0, 1.2]))) == []
    # minimum + 2 evaluations: the rise spans 3 evaluations
    assert len(check("HD405", make_run(tmp_path, _overfit_history([1.5, 1.0, 1.2, 1.3]), name="b.json"))) == 1
    # rise below overfit_rise_fraction (5%)
    assert check("HD405", make_run(tmp_path, _overfit_history([1.5, 1.0, 1.02, 1.04, 1.03]), name="c.json")) == []


def test_rising_eval_loss_with_improving_selection_metric_is_info(tmp_path):
    wer = [40.0, 30.0, 25.0, 22.0, 20.0, 19.0]
    h = _overfit_history([1.5, 1.2, 1.0, 1.08, 1.15, 1.25], eval_wer=wer)
    run = make_run(tmp_path, h, args={"metric_for_best_model": "wer", "greater_is_better": False,
                                      "load_best_model_at_end": True})
    f = one("HD410", run)
    assert f.severity == Severity.INFO and "eval_wer" in f.title
    assert check("HD405", run) == []
    # inferred from best_metric when the args are not known
    run = make_run(tmp_path, h, name="b.json", best_metric=19.0, best_model_checkpoint="o/checkpoint-600")
    f = one("HD410", run)
    assert check("HD405", run) == []
    assert f.severity == Severity.INFO
    assert any("inferred" in e for e in f.evidence)
    assert any("is not the eval_loss minimum" in e for e in f.evidence)


def test_falling_eval_loss_is_not_overfitting(tmp_path):
    run = make_run(tmp_path, _overfit_history([1.5, 1.2, 1.0, 0.9, 0.85], eval_wer=[40.0, 30.0, 25.0, 22.0, 20.0]),
                   args={"metric_for_best_model": "wer"})
    assert check("HD405", run) == [] and check("HD410", run) == []


# ---- HD501-HD508 lr-schedule ----------------------------------------------------------------------------

SCHEDULE_CODES = ("HD501", "HD502", "HD503", "HD504", "HD505", "HD506", "HD507", "HD508")


def _lin(steps, peak=2e-4, warmup=10, total=None):
    total = total or steps[-1]
    return [peak * s / warmup if s < warmup else peak * max(0.0, (total - s) / (total - warmup)) for s in steps]


def _rule_findings(code, run):
    """One rule's findings as a report shows them: through the registry (code, explanation and fix filled in)."""
    return run_checks(run, T, Selection(select=(code,)))


def _one_finding(code, run):
    fs = _rule_findings(code, run)
    assert len(fs) == 1, [(f.severity, f.title) for f in fs]
    f = fs[0]
    assert f.code == code and f.title and f.evidence and f.explanation and f.fix
    return f


def _schedule_findings(run):
    """Every lr-schedule rule's findings on ``run``, through the registry."""
    return run_checks(run, T, Selection(select=SCHEDULE_CODES))


def _only(code, run):
    """The one finding of the schedule rules on ``run``, which must be of ``code``."""
    fs = _schedule_findings(run)
    assert [f.code for f in fs] == [code], [(f.code, f.title) for f in fs]
    f = fs[0]
    assert f.title and f.evidence and f.explanation and f.fix
    return f


def test_linear_schedule_with_final_zero_is_quiet(tmp_path):
    steps = list(range(1, 101))
    args = {"learning_rate": 2e-4, "warmup_steps": 10, "lr_scheduler_type": "linear", "max_steps": 100,
            "logging_steps": 1}
    run = make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=_lin(steps)), args=args)
    assert _lin(steps)[-1] == 0.0
    assert _schedule_findings(run) == []


def test_single_first_zero_is_quiet(tmp_path):
    steps = list(range(1, 101))
    lr = [0.0] + [2e-4] * 99
    assert _schedule_findings(make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=lr))) == []


def test_lr_stuck_at_zero_before_the_end_is_warning(tmp_path):
    steps = list(range(1, 101))
    lr = _lin(steps, total=60)[:60] + [0.0] * 40
    f = _only("HD501", make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=lr)))
    assert f.severity == Severity.WARNING
    assert f.steps == (60, 100)
    assert "num_training_steps" in f.fix
    assert any("the last 40% of the logged run" in e for e in f.evidence)


def test_lr_zero_everywhere_is_critical(tmp_path):
    steps = list(range(1, 21))
    f = _only("HD501", make_run(tmp_path, history(steps, loss=decaying(20), learning_rate=[0.0] * 20)))
    assert f.severity == Severity.CRITICAL and f.steps == (1, 20)
    # with a decaying scheduler configured, a rate of 0 throughout is not also "no decay" or a peak mismatch
    args = {"learning_rate": 2e-4, "warmup_steps": 5, "lr_scheduler_type": "cosine", "max_steps": 20}
    f = _only("HD501", make_run(tmp_path, history(steps, loss=decaying(20), learning_rate=[0.0] * 20), args=args,
                                name="b.json"))
    assert f.severity == Severity.CRITICAL


def test_leading_zeros_are_info(tmp_path):
    steps = list(range(1, 101))
    lr = [0.0] * 6 + [2e-4] * 94
    f = _only("HD502", make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=lr)))
    assert f.severity == Severity.INFO and f.steps == (1, 6) and "first 6 logged steps" in f.title
    # below lr_zero_min_points (3): quiet
    lr = [0.0] * 2 + [2e-4] * 98
    assert _rule_findings("HD502", make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=lr), name="b.json")) == []


def test_warmup_longer_than_the_run(tmp_path):
    steps = list(range(1, 151))
    lr = [2e-3 * s / 1000 for s in steps]
    args = {"learning_rate": 2e-3, "warmup_steps": 1000, "lr_scheduler_type": "linear", "max_steps": 150}
    f = _only("HD503", make_run(tmp_path, history(steps, loss=decaying(150), learning_rate=lr), args=args))
    assert f.severity == Severity.WARNING and "never reached" in f.title
    assert "warmup_steps=7" in f.fix  # the evidence-specific detail after the rule's fix
    # without the args: an lr still rising at the last step of a finished run
    f = _only("HD504", make_run(tmp_path, history(steps, loss=decaying(150), learning_rate=lr), name="b.json"))
    assert f.severity == Severity.WARNING and "rises until the last step" in f.title
    # the same rate in a run that has not reached max_steps yet is still warming up
    assert _rule_findings("HD504", make_run(tmp_path, history(steps, loss=decaying(150), learning_rate=lr), name="c.json",
                                   max_steps=1000)) == []


def test_warmup_as_long_as_the_run_from_warmup_ratio(tmp_path):
    steps = list(range(1, 101))
    lr = [1e-4 * s / 100 for s in steps]
    args = {"learning_rate": 1e-4, "warmup_ratio": 1.0, "lr_scheduler_type": "linear", "max_steps": 100}
    f = _one_finding("HD503", make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=lr), args=args))
    assert any("warmup_ratio=1 x max_steps 100" in e for e in f.evidence)
    args["warmup_ratio"] = 0.1
    assert _rule_findings("HD503", make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=lr), args=args,
                                   name="b.json")) == []


def test_constant_with_warmup_is_not_rising_to_the_end(tmp_path):
    steps = list(range(1, 129))
    lr = [1e-5] + [2e-5] * 127
    assert _schedule_findings(make_run(tmp_path, history(steps, loss=decaying(128), learning_rate=lr))) == []


def test_no_decay_under_a_decaying_scheduler(tmp_path):
    steps = list(range(1, 201))
    lr = [2e-4 * min(1, s / 10) for s in steps]
    args = {"learning_rate": 2e-4, "warmup_steps": 10, "lr_scheduler_type": "cosine", "max_steps": 200}
    f = _only("HD507", make_run(tmp_path, history(steps, loss=decaying(200), learning_rate=lr), args=args))
    assert f.severity == Severity.WARNING and "No decay" in f.title
    args["lr_scheduler_type"] = "constant_with_warmup"
    assert _schedule_findings(make_run(tmp_path, history(steps, loss=decaying(200), learning_rate=lr), args=args,
                                       name="b.json")) == []


def test_peak_step_and_value_differ_from_the_config(tmp_path):
    steps = list(range(1, 201))
    lr = _lin(steps, peak=1e-4, warmup=50, total=200)
    args = {"learning_rate": 2e-4, "warmup_steps": 10, "lr_scheduler_type": "linear", "max_steps": 200,
            "logging_steps": 1}
    fs = {f.code: f for f in _schedule_findings(
        make_run(tmp_path, history(steps, loss=decaying(200), learning_rate=lr), args=args))}
    assert set(fs) == {"HD505", "HD506"}
    assert all(f.severity == Severity.INFO for f in fs.values())
    assert "peaks at step 50" in fs["HD505"].title and fs["HD505"].steps == (1, 50)
    assert "differs from TrainingArguments.learning_rate" in fs["HD506"].title
    # the configured warmup and rate: both quiet
    args.update(learning_rate=1e-4, warmup_steps=50)
    assert _schedule_findings(make_run(tmp_path, history(steps, loss=decaying(200), learning_rate=lr), args=args,
                                       name="b.json")) == []


def test_lr_recommendation_only_for_higgs_runs(tmp_path):
    steps = list(range(1, 101))
    lr = _lin(steps, peak=2e-3)
    plain = make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=lr))
    assert not is_higgs_run(plain)
    assert _schedule_findings(plain) == []
    higgs = make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=lr), name="b.json",
                     model_config={"model_type": "higgs_audio", "audio_num_codebooks": 8})
    assert is_higgs_run(higgs)
    f = _only("HD508", higgs)
    assert f.severity == Severity.INFO and "Higgs" in f.title and REGISTRY["HD508"].scope == "higgs"
    ok = make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=_lin(steps, peak=5e-5),
                                    audio_loss=decaying(100, 7.0, 4.0)), name="c.json")
    assert is_higgs_run(ok)  # by the logged audio loss
    assert _schedule_findings(ok) == []


def test_schedule_is_read_once_per_run(tmp_path, monkeypatch):
    """The rules share one reading of the run (schedule.schedule's cache); a changed run is read again."""
    from higgs_diag.checks import schedule as sched

    calls = []
    real = sched._read_schedule
    monkeypatch.setattr(sched, "_read_schedule", lambda run, t: calls.append(run) or real(run, t))
    steps = list(range(1, 101))
    args = {"learning_rate": 2e-4, "warmup_steps": 10, "lr_scheduler_type": "linear", "max_steps": 100}
    run = make_run(tmp_path, history(steps, loss=decaying(100), learning_rate=_lin(steps)), args=args)
    _schedule_findings(run)
    assert len(calls) == 1
    run.args = dict(args, warmup_steps=1000)
    assert "HD503" in {f.code for f in _schedule_findings(run)} and len(calls) == 2


def test_schedule_rules_are_quiet_on_the_healthy_fixture():
    found = _schedule_findings(_fixture("healthy"))
    # the tiny fixture model trains at 2e-3 on purpose: only the Higgs range information
    assert [(f.code, f.severity) for f in found] == [("HD508", Severity.INFO)]


# ---- HD005-HD009, HD105, HD106: conditions split out of HD001, HD004, HD102 -------------------------------

def _run_dir(tmp_path, log=None, checkpoints=(), **state_files):
    """A run folder read by the real loader: a healthy trainer_state.json, optionally a train.log,
    checkpoint folders ``{name: [files]}`` (empty files) and extra ``{relative path: text}`` state files."""
    root = tmp_path / "run"
    root.mkdir(parents=True)
    steps = list(range(1, 31))
    (root / "trainer_state.json").write_text(json.dumps(
        {"global_step": 30, "max_steps": 30, "logging_steps": 1,
         "log_history": history(steps, loss=decaying(30), learning_rate=[5e-5] * 30)}))
    if log is not None:
        (root / "train.log").write_text(log)
    for name, files in dict(checkpoints).items():
        (root / name).mkdir()
        for f in files:
            (root / name / f).write_text("{}" if f.endswith(".json") else "")
    for rel, text in state_files.items():
        (root / rel.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (root / rel.replace("__", "/")).write_text(text)
    return higgs_diag.load_run(root)


NEW_SPLIT_CODES = ("HD005", "HD006", "HD007", "HD008", "HD009", "HD105", "HD106")
_TRACEBACK = ('Traceback (most recent call last):\n  File "train.py", line 9, in <module>\n'
              "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n")


def test_crash_then_completed_is_not_the_unexplained_crash(tmp_path):
    crashed = _run_dir(tmp_path / "a", log="step 1\n" + _TRACEBACK)
    assert [f.code for f in _rule_findings("HD004", crashed)] == ["HD004"] and _rule_findings("HD005", crashed) == []
    resumed = _run_dir(tmp_path / "b", log="step 1\n" + _TRACEBACK + "resuming\nTraining completed. Do not forget\n")
    f = _one_finding("HD005", resumed)
    assert f.severity == Severity.INFO and "RuntimeError" in f.title and len(f.evidence) == 2
    assert _rule_findings("HD004", resumed) == []


@pytest.mark.parametrize("code, path, text, needle", [
    ("HD006", "checkpoint-10__trainer_state.json", "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
     "Git LFS pointer"),
    ("HD007", "checkpoint-10__trainer_state.json", "[1, 2]", "not a HF Trainer state"),
    ("HD008", "checkpoint-10__trainer_state.json", '{"global_step": 3, "log_history": []}', "nothing logged"),
    ("HD009", "checkpoint-10__trainer_state.json",
     '{"global_step": 3, "log_history": [{"step": 3, "loss": 1.0, "note": "text"}]}', "not numbers"),
    ("HD001", "checkpoint-10__trainer_state.json", '{"global_step": 3, "log_history": [{"step": 1, "loss": 2.0}, ',
     "could not be read completely"),
])
def test_each_input_problem_kind_has_its_own_code(tmp_path, code, path, text, needle):
    run = _run_dir(tmp_path, **{path: text})
    found = [f for c in ("HD001",) + NEW_SPLIT_CODES[1:5] for f in _rule_findings(c, run)]
    assert [f.code for f in found] == [code], [(f.code, f.title) for f in found]
    assert needle in found[0].title and "checkpoint-10/trainer_state.json" in found[0].title
    assert found[0].severity == (Severity.WARNING if code == "HD001" else Severity.INFO)


def test_checkpoint_without_trainer_state(tmp_path):
    weights = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"]
    run = _run_dir(tmp_path / "a", checkpoints={"checkpoint-10": weights + ["trainer_state.json"],
                                                "checkpoint-20": weights})
    f = _one_finding("HD105", run)
    assert f.severity == Severity.WARNING and f.steps == (20, 20) and "checkpoint-20" in f.title
    assert any("last complete checkpoint" in e and "checkpoint-10" in e for e in f.evidence)
    complete = _run_dir(tmp_path / "b", checkpoints={"checkpoint-20": weights + ["trainer_state.json"]})
    assert _rule_findings("HD105", complete) == []


def test_early_stopping_disabled(tmp_path):
    line = ("W0101 trainer_callback.py:650] early stopping required metric_for_best_model, but did not find "
            "eval_bleu so early stopping is disabled\n")
    f = _one_finding("HD106", _run_dir(tmp_path / "a", log=line))
    assert f.severity == Severity.WARNING and "early stopping is disabled" in f.evidence[0]
    assert f.caused_by is None  # no evaluation without eval_loss explains it
    assert _rule_findings("HD106", _run_dir(tmp_path / "b", log="step 1\n")) == []
    # early stopping on eval_loss while the evaluations computed no loss: HD101 is the cause
    from higgs_diag.run.model import LogEvent

    steps = list(range(1, 21))
    run = make_run(tmp_path, history(steps, loss=decaying(20)) + [{"step": 10, "eval_runtime": 1.0}],
                   args={"metric_for_best_model": "eval_loss"})
    run.log_events = [LogEvent("early-stopping-disabled", "train.log", 5, line.replace("eval_bleu", "eval_loss"))]
    assert _one_finding("HD106", run).caused_by == "HD101"


def test_split_codes_are_quiet_on_the_healthy_fixture():
    healthy = _fixture("healthy")
    assert [(f.code, f.title) for c in NEW_SPLIT_CODES for f in _rule_findings(c, healthy)] == []


# ---- HD701/HD703/HD704 resume-discontinuity, HD705 mixed-runs ----------------------------------------

RESUME_CODES = ("HD701", "HD703", "HD704", "HD705")


def test_epoch_reset_is_info(tmp_path):
    steps = list(range(100, 3100, 100))
    h = history(steps, loss=decaying(30))
    for i, e in enumerate(h):
        e["epoch"] = round((i % 10) * 0.1, 2)
    run = make_run(tmp_path, h, logging_steps=100)
    f = one("HD703", run)
    assert f.severity == Severity.INFO and "epoch goes back 2" in f.title
    assert f.steps == (1000, 2100)
    assert check("HD701", run) == []  # the steps themselves never go back


def test_relogged_steps_of_a_resumed_tensorboard_log(tmp_path):
    rows = [(s, "loss", 3.0 - s / 1000) for s in range(10, 1510, 10)]
    rows += [(s, "loss", 3.0 - s / 1000, "events.out.tfevents.1", 1) for s in range(1010, 2010, 10)]
    run = scalars_run(rows)
    f = one("HD701", run)
    assert f.severity == Severity.INFO
    assert any("from 1500 to 1010" in e and "50 logged step(s) logged again" in e for e in f.evidence)
    assert check("HD705", run) == []  # a resume, not a second run


def test_resumed_run_in_a_second_event_file(tmp_path):
    rows = [(s, "loss", 3.0 - s / 1000, "runs/a/events.out.tfevents.1") for s in range(10, 1510, 10)]
    rows += [(s, "loss", 3.0 - s / 1000, "runs/b/events.out.tfevents.2") for s in range(1010, 2010, 10)]
    rows += [(s, "eval_loss", 2.0, "runs/a/events.out.tfevents.3") for s in range(500, 2001, 500)]
    f = one("HD701", scalars_run(rows))
    assert any("a/events.out.tfevents.1 -> b/events.out.tfevents.2" in e and "from 1500 to 1010" in e
               for e in f.evidence)


def test_separate_runs_in_one_logging_dir_are_told_apart_from_resumes():
    rows = [(s, "loss", 3.0 - s / 1000, "runs/a/events.1") for s in range(10, 510, 10)]
    rows += [(s, "loss", 3.0 - s / 1000, "runs/b/events.2") for s in range(10, 510, 10)]
    run = scalars_run(rows)
    f = one("HD705", run)
    assert "2 different runs" in f.title and any("starts over" in e for e in f.evidence)
    assert check("HD701", run) == []


def test_overfitting_compares_only_the_last_session_of_merged_evaluations():
    # evaluations of several short runs piled in one logging dir, then one real run
    rows = [(15, "eval_loss", 0.95, "e1"), (12, "eval_loss", 1.07, "e2"), (9, "eval_loss", 0.68, "e3"),
            (10, "eval_loss", 0.63, "e4"), (15, "eval_loss", 0.60, "e5"), (25, "eval_loss", 0.55, "e5")]
    assert check("HD405", scalars_run(rows)) == []
    rows += [(20, "eval_loss", 1.0, "e6"), (200, "eval_loss", 0.8, "e6"), (300, "eval_loss", 0.9, "e6"),
             (400, "eval_loss", 1.0, "e6")]
    f = one("HD405", scalars_run(rows))
    assert f.steps == (200, 400)
    assert any("earlier eval_loss" in e for e in f.evidence)


def test_gap_in_logged_steps(tmp_path):
    steps = list(range(10, 510, 10)) + list(range(1000, 1510, 10))
    f = one("HD704", make_run(tmp_path, history(steps, loss=decaying(len(steps))), logging_steps=10))
    assert f.severity == Severity.INFO
    assert any("between steps 500 and 1000" in e for e in f.evidence)
    assert f.steps == (500, 1000)


def test_checkpoints_of_different_runs(tmp_path):
    steps = list(range(1, 51))
    run = make_run(tmp_path, history(steps, loss=decaying(50)))
    run.states = [TrainerStateInfo(path="out/checkpoint-500/trainer_state.json", max_steps=1500, logging_steps=1),
                  TrainerStateInfo(path="out/checkpoint-1689/trainer_state.json", max_steps=1689, logging_steps=500)]
    f = one("HD705", run)
    assert "2 different runs" in f.title and any("max_steps=1689" in e for e in f.evidence)
    assert check("HD701", run) == []


def test_regular_run_has_no_resume_finding(tmp_path):
    steps = list(range(10, 1010, 10))
    regular = make_run(tmp_path, history(steps, loss=decaying(100)), logging_steps=10)
    # logging_first_step: step 1, then every 10 steps, is not a gap
    steps = [1] + list(range(10, 1010, 10))
    first = make_run(tmp_path, history(steps, loss=decaying(101)), logging_steps=10, name="b.json")
    for run in (regular, first):
        assert [f for code in RESUME_CODES for f in check(code, run)] == []


# ---- robustness ----------------------------------------------------------------------------------------

def test_degenerate_runs_never_raise():
    """Empty runs, single points, NaN/Inf/negative values everywhere, odd args and states: no traceback,
    and every finding is complete."""
    rng = np.random.RandomState(7)
    vals = [0.0, math.nan, math.inf, -math.inf, 1.0, -1.0, 1e-30, 1e30, 0.001, 2.0]
    metrics = ["loss", "grad_norm", "learning_rate", "eval_loss", "epoch", "audio_loss", "eval_wer", "rewards/chosen"]
    argsets = [None,
               {"warmup_steps": 5, "max_steps": 10, "lr_scheduler_type": "cosine", "learning_rate": 1.0,
                "metric_for_best_model": "wer", "max_grad_norm": 0},
               {"warmup_ratio": 0.5, "lr_scheduler_type": "SchedulerType.LINEAR", "learning_rate": "x",
                "logging_steps": 0.1, "max_grad_norm": "1"}]
    runs = [Run(root="empty")]
    for i in range(150):
        rows = [(int(rng.randint(0, 30)), metrics[rng.randint(len(metrics))], vals[rng.randint(len(vals))],
                 "f" if rng.rand() < 0.5 else "g", int(rng.rand() < 0.2)) for _ in range(rng.randint(1, 60))]
        state = TrainerStateInfo(path="p", max_steps=[None, 0, 10, -1][i % 4], logging_steps=[None, 0, 0.5, 5][i % 4],
                                 best_metric=[None, "x", 1.0, math.nan][i % 4],
                                 best_model_checkpoint=[None, "out/checkpoint-3", "zz", None][i % 4])
        runs.append(scalars_run(rows, args=argsets[i % 3], state=state, states=[state, TrainerStateInfo(path="q")],
                                model_config={"model_type": "higgs_audio"} if i % 5 == 0 else None))
    for run in runs:
        for code in MY_CODES:
            for f in check(code, run):
                assert f.title and f.evidence and f.explanation and f.fix
                assert f.steps is None or f.steps[0] <= f.steps[1]


# The modules that hold the numerics, optimisation, gradient, overfitting and resume rules.
CURVE_MODULES = ("numerics", "optimisation", "gradients", "overfitting", "resume")


def _curve_codes():
    return sorted(c.code for c in REGISTRY.values() if c.func.__module__.rsplit(".", 1)[-1] in CURVE_MODULES)


def _shuffled_run(n, *, segments):
    """A Run of ``n`` log entries in shuffled order (each with loss, grad_norm, learning_rate and epoch, every
    10th with eval_loss), split between two event files: the steps go back at about every other entry.
    ``segments``: number the sessions per (file, metric) as the reader does, else leave them 0."""
    rng = np.random.RandomState(11)
    steps = rng.permutation(np.arange(1, n + 1))
    files = np.where(rng.rand(n) < 0.5, "runs/a/events.out.tfevents.1", "runs/b/events.out.tfevents.2")
    cols = {"loss": 3 - steps / n + 0.05 * rng.rand(n), "grad_norm": 1 + 50 * (rng.rand(n) < 0.01),
            "learning_rate": np.full(n, 1e-4), "epoch": 3 * steps / n}
    frames = [pd.DataFrame({"entry": np.arange(n), "step": steps, "metric": m, "value": v, "file": files})
              for m, v in cols.items()]
    ev = np.arange(0, n, 10)
    frames.append(pd.DataFrame({"entry": ev, "step": steps[ev], "metric": "eval_loss", "value": 1 + rng.rand(len(ev)),
                                "file": files[ev]}))
    df = pd.concat(frames, ignore_index=True).sort_values("entry", kind="stable").reset_index(drop=True)
    df["source"], df["wall_time"] = "tensorboard", np.nan
    df["segment"] = 0
    if segments:
        back = df.groupby(["file", "metric"])["step"].diff() < 0
        df["segment"] = back.astype("int64").groupby([df["file"], df["metric"]]).cumsum()
    df = df[SCALAR_COLUMNS].astype({"step": "int64", "segment": "int64", "value": "float64"})
    return Run(root="mem", scalars=df, state=TrainerStateInfo(path="p", max_steps=n, logging_steps=1))


@pytest.mark.parametrize("segments", [False, True])
def test_curve_rules_are_linear_in_the_number_of_points(segments):
    """100k log entries whose steps go back at every other entry (~50k restarts) go through every numerics,
    optimisation, gradient, overfitting and resume rule in a few seconds (the resume rule was quadratic in
    the restarts: 19 s for 20k entries). The bound is a hang guard, not a benchmark."""
    import time

    run = _shuffled_run(100_000, segments=segments)
    t0 = time.perf_counter()
    found = {f.code: f for code in _curve_codes() for f in check(code, run)}
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, f"{elapsed:.1f} s"
    assert "HD701" in found and "restart point(s)" in found["HD701"].evidence[-1]  # the restarts were all seen


# ---- the real corpus ----------------------------------------------------------------------------------

def _corpus_index():
    with open(CORPUS / "INDEX.tsv", newline="") as fh:
        return {r["file"]: r for r in csv.DictReader(fh, delimiter="\t")}


@pytest.fixture(scope="module")
def corpus_results():
    if not CORPUS.exists():
        pytest.skip(f"corpus not found at {CORPUS}")
    out = {}
    for p in sorted(CORPUS.glob("*.json")):
        try:
            run = higgs_diag.load_run(p)
        except RunReadError:
            continue  # LFS pointers and the like: the reader's and the input check's business
        out[p.name] = (run, [f for code in MY_CODES for f in _with_code(code, run)])
    return out


def _with_code(code, run):
    return check(code, run)


# What a careful engineer reading these curves would also call out: every warning or critical the
# generic checks raise on the corpus (information findings are not listed).
EXPECTED_LOUD = {
    ("DiegoArteagaMendoza__AnalisisDeTacticasEnSoftwareClinicoUtilizandoCodeBERT__trainer_state.json", "HD405"),
    ("Hahaazaza__Neiro__trainer_state.json", "HD405"),
    ("ShashankBommana__DNABERT-2__trainer_state.json", "HD405"),
    ("SwapnilupGrad__HugginFace__trainer_state.json", "HD405"),
    ("befawzy__Decision-transformers__output__POMDP__samples_100000__epsilon_0__epochs_5__K_20__checkpoint-1500"
     "__trainer_state.json", "HD405"),
    ("HaoKen123__ChuyenDE__checkpoint-1500__trainer_state.json", "HD305"),   # one NaN grad_norm, loss finite
    ("poludmik__qlora-fine-tune__output__trainer_state.json", "HD402"),     # lr=5: 1.64 -> ln(32000)=10.37
}


def test_corpus_runs_without_exceptions_and_with_a_sensible_loudness(corpus_results):
    assert len(corpus_results) >= 85
    loud = {(name, f.code) for name, (_run, fs) in corpus_results.items() for f in fs
            if f.severity >= Severity.WARNING}
    assert loud == EXPECTED_LOUD, (sorted(loud - EXPECTED_LOUD), sorted(EXPECTED_LOUD - loud))


def test_corpus_no_critical_without_a_non_finite_loss(corpus_results):
    for name, (run, fs) in corpus_results.items():
        crit = [f for f in fs if f.severity == Severity.CRITICAL]
        if crit:
            loss = run.series("loss").to_numpy()
            assert not np.isfinite(loss).all(), (name, [f.title for f in crit])


def test_corpus_findings_are_complete(corpus_results):
    for name, (_run, fs) in corpus_results.items():
        for f in fs:
            assert f.title and f.evidence and f.explanation and f.fix, (name, f.code)
            if f.steps is not None:
                assert f.steps[0] <= f.steps[1], (name, f.code, f.steps)


def test_corpus_calibration_against_the_index(corpus_results):
    index = _corpus_index()
    for name, (run, fs) in corpus_results.items():
        row = index.get(name, {})
        flags = set((row.get("flags") or "").split(","))
        codes = {f.code: f for f in fs}
        assert not is_higgs_run(run), name
        if "gradspike" in flags and "HD403" in codes:
            assert codes["HD403"].severity <= Severity.WARNING
        if "overfit" in flags:  # overfitting, or a rising eval_loss under an improving selection metric
            assert "HD405" in codes or "HD410" in codes, name
        if "LLM RL/preference" in (row.get("domain") or "") or name.startswith("aigoncharov"):
            assert not ({"HD402", "HD404", "HD409"} & set(codes)), (name, list(codes))
        if "backwards" in flags:  # epoch resets (HD703), else steps that go back (a resume, HD701)
            assert ("HD703" if "epoch resets" in (row.get("notable") or "") else "HD701") in codes, name
    hao = {f.code: f for f in corpus_results["HaoKen123__ChuyenDE__checkpoint-1500__trainer_state.json"][1]}
    assert hao["HD305"].severity == Severity.WARNING and hao["HD305"].steps == (20, 20)
    assert "HD301" not in hao  # the loss stays finite
    whisper = {f.code: f for f in corpus_results["anthonyrathe__fixed-whisperv2-flemish__trainer_state.json"][1]}
    assert whisper["HD410"].severity == Severity.INFO and "HD405" not in whisper  # WER keeps improving: judge by WER


# ---- fixture training runs (fixtures/make_runs.py) -------------------------------------------------------

def _fixture(name):
    path = RUNS / name
    if not path.exists():
        pytest.skip(f"fixture run {path} not generated yet (python fixtures/make_runs.py)")
    return higgs_diag.load_run(path)


def _mine(run):
    found = [f for f in run_checks(run) if f.code in MY_CODES]
    return {f.code: f for f in found}, found


@pytest.mark.parametrize("scenario", ["healthy", "healthy-lora"])
def test_fixture_healthy_runs_are_quiet(scenario):
    _codes, found = _mine(_fixture(scenario))
    loud = [(f.code, str(f.severity), f.title) for f in found if f.severity >= Severity.WARNING]
    assert loud == []


@pytest.mark.parametrize("scenario,code,severity", [
    ("no-learning", "HD401", Severity.CRITICAL),
    ("nan-masked", "HD302", Severity.CRITICAL),
    ("overfitting", "HD405", Severity.WARNING),
    ("lr-schedule", "HD503", Severity.WARNING),  # warmup_steps 1000 > max_steps 150
])
def test_fixture_fault_is_found(scenario, code, severity):
    codes, found = _mine(_fixture(scenario))
    assert code in codes, [(f.code, str(f.severity), f.title) for f in found]
    assert max(f.severity for f in found if f.code == code) >= severity


# The rules split out of HD301/HD302 (numerics), HD401/HD403/HD404/HD405 (optimisation) and HD701 (resume):
# each fires on a hand-built run above and says nothing at all on the healthy training run.
SPLIT_CODES = ("HD303", "HD304", "HD305", "HD306", "HD406", "HD407", "HD408", "HD409", "HD410", "HD703", "HD704",
               "HD705")


@pytest.mark.parametrize("code", SPLIT_CODES)
def test_fixture_healthy_run_has_no_finding_of_a_split_rule(code):
    assert code in REGISTRY
    assert check(code, _fixture("healthy")) == []


def test_fixture_nan_masked_evidence_names_grad_norm():
    codes, _ = _mine(_fixture("nan-masked"))
    f = codes["HD302"]
    assert "grad_norm" in f.metrics and any("grad_norm" in e for e in f.evidence)
