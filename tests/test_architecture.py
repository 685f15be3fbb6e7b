"""The shape of the house: one direction of imports, readable units, one collapse rule, one composition of
analyze and replay (the API), and rule selection."""
from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import pytest

import higgs_diag
from higgs_diag.checks import REGISTRY, load_all
from higgs_diag.cli import main
from higgs_diag.config import Selection, Thresholds, load_config_file
from _cli_util import runner

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "higgs_diag"
REPLAY = ROOT / "fixtures" / "replay"
RUNS = ROOT / "fixtures" / "runs"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, with relative imports resolved to absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    pkg = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1] if node.level > 1 else pkg
                mod = ".".join(base + ([node.module] if node.module else []))
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
            else:
                out.add(node.module or "")
    return out


def _files(*subpaths: str) -> list[Path]:
    out = []
    for sp in subpaths:
        p = PKG / sp
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def test_import_direction():
    """checks/ never imports replay/ or trainer/; run/, checks/, diagnosis, report/ (and the modules they use)
    never import torch: the analyze path stays light and replay only measures."""
    for f in _files("checks"):
        bad = [m for m in _imports(f) if m.startswith(("higgs_diag.replay", "higgs_diag.trainer"))]
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
    for f in _files("run", "checks", "report", "diagnosis.py", "evidence.py", "collapse.py", "config.py",
                    "formatting.py", "layout.py", "api.py"):
        bad = [m for m in _imports(f) if m.split(".")[0] in ("torch", "transformers", "peft", "boson_multimodal")]
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
    for f in _files("replay"):
        bad = [m for m in _imports(f) if m.startswith(("higgs_diag.checks", "higgs_diag.api", "higgs_diag.report"))]
        assert not bad, f"{f.relative_to(ROOT)} (replay measures, it does not judge) imports {bad}"


def test_readable_units():
    """No module over 600 lines and no function over 120 lines in higgs_diag/."""
    for f in _files("."):
        text = f.read_text(encoding="utf-8")
        assert text.count("\n") <= 600, f"{f.relative_to(ROOT)} has {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 120, f"{f.relative_to(ROOT)}:{node.lineno} {node.name} has {n} lines"


def test_no_name_is_both_a_function_and_a_subpackage():
    assert not callable(__import__("higgs_diag.replay").replay)
    assert callable(higgs_diag.replay_batch) and callable(higgs_diag.analyze)


def test_one_rule_per_code_and_prose_once():
    """Every code is one registered rule whose docs give the Why and the Fix; findings carry exactly them."""
    rules = load_all()
    assert rules and all(c.code == code for code, c in rules.items())
    diag = higgs_diag.analyze(RUNS / "eval-loss-missing")
    for f in diag.findings:
        rule = REGISTRY[f.code]
        assert f.category == rule.category
        assert f.explanation == rule.why
        assert f.fix.startswith(rule.fix)


def test_every_threshold_is_declared_by_a_rule_or_the_monitor():
    declared = {n for c in load_all().values() for n in c.thresholds}
    monitor_only = {"audio_recovery_steps"}  # also HD201's, declared there
    for name in Thresholds.names():
        assert name in declared or name in monitor_only, f"threshold {name} is read by no declared rule"


# ---- one collapse rule ---------------------------------------------------------------------------------
def _series(every: int) -> list[tuple[int, float]]:
    """A loss that sinks below 0.01, makes short excursions above it (shorter than the recovery window),
    sinks below 0.005, stays down long enough to be sustained, then recovers for good."""
    out = []
    for step in range(1, 901, every):
        if step < 200:
            v = 7.0 * math.exp(-step / 40)
        elif step < 500:
            v = 0.008 if (step // 7) % 5 else 0.02  # short excursions above the warning level
        elif step < 700:
            v = 0.004
        else:
            v = 3.0
        out.append((step, max(v, 1e-4)))
    return out


@pytest.mark.parametrize("every", [1, 10])
def test_monitor_and_hd201_give_the_same_level_at_every_step(every, tmp_path):
    from higgs_diag.collapse import collapse_levels
    from higgs_diag.run.model import Run
    from higgs_diag.trainer.monitor import AudioLossMonitor

    import numpy as np
    import pandas as pd

    series = _series(every)
    mon = AudioLossMonitor()
    live = []
    for step, v in series:
        mon.update(step, v)
        live.append(mon.level)
    t = Thresholds()
    offline, _ = collapse_levels([s for s, _ in series], [v for _, v in series], warning=t.audio_loss_warning,
                                 critical=t.audio_loss_critical, window=t.audio_sustained_window,
                                 recovery_steps=t.audio_recovery_steps)
    assert live == offline
    assert max(live) == 3 and live[-1] == 0  # sustained, then recovered
    # HD201 on the same series as a logged run says what the monitor said at its worst
    steps = np.array([s for s, _ in series])
    df = pd.DataFrame({"step": steps, "metric": "audio_loss", "value": [v for _, v in series],
                       "source": "trainer_state", "wall_time": np.nan, "file": "trainer_state.json", "segment": 0})
    f = list(REGISTRY["HD201"].func(Run(root="r", scalars=df), t))
    assert len(f) == 1 and str(f[0].severity) == "critical"
    first_alert = next(s for (s, _), lv in zip(series, live) if lv > 0)
    assert f[0].steps[0] == first_alert
    assert any("stayed below" in e for e in f[0].evidence) and any("recovered" in e for e in f[0].evidence)


# ---- the API composes, the CLI only parses and renders -------------------------------------------------
def test_analyze_replay_api_equals_cli():
    run_dir = REPLAY / "audio-labels-unshifted"
    diag = higgs_diag.analyze(run_dir, replay=True)
    r = runner().invoke(main, ["analyze", str(run_dir), "--replay", "--format", "json"])
    assert r.exit_code == 1, r.stderr
    doc = json.loads(r.stdout)
    assert [f["code"] for f in doc["findings"]] == [f.code for f in diag.findings]
    assert [f["title"] for f in doc["findings"]] == [f.title for f in diag.findings]
    assert diag.findings[0].code == "HD801" and doc["summary"]["replay"]["n_batches"] >= 1


def test_replay_with_nothing_to_replay_keeps_the_log_report(tmp_path):
    """A run that crashed before its first checkpoint: --replay keeps the log findings, adds HD810 (info) and
    exits by the findings, not 2."""
    run_dir = tmp_path / "crashed"
    shutil.copytree(RUNS / "crashed", run_dir)
    logs_only = higgs_diag.analyze(run_dir)
    diag = higgs_diag.analyze(run_dir, replay=True)
    assert [f.code for f in diag.findings if f.code != "HD810"] == [f.code for f in logs_only.findings]
    note = diag.by_code("HD810")
    assert note and str(note[0].severity) == "info" and "batch" in note[0].evidence[0]
    r = runner().invoke(main, ["analyze", str(run_dir), "--replay"])
    assert r.exit_code == (1 if logs_only.at_or_above(higgs_diag.diagnosis.Severity.WARNING) else 0)
    assert "HD810" in r.stdout
    # naming batches that do not exist is the user's error: the report is still printed, exit 2
    r = runner().invoke(main, ["analyze", str(run_dir), "--batches", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "replay skipped" in r.stderr and "HD810" in r.stdout


# ---- --select / --ignore ----------------------------------------------------------------------------------
def test_selection_by_code_prefix_and_category():
    s = Selection(select=("HD1", "audio-loss-collapse"), ignore=("HD102",))
    assert s.allows("HD101", "eval-loss-missing") and s.allows("HD201", "audio-loss-collapse")
    assert not s.allows("HD102", "best-metric-missing") and not s.allows("HD401", "no-learning")
    with pytest.raises(ValueError, match="HD999"):
        Selection(select=("HD999",)).validate(load_all(), {c.category for c in load_all().values()})


def test_select_and_ignore_in_api_cli_and_config_file(tmp_path):
    run_dir = RUNS / "eval-loss-missing"
    full = {f.code for f in higgs_diag.analyze(run_dir).findings}
    assert {"HD101", "HD102"} <= full
    assert {f.code for f in higgs_diag.analyze(run_dir, ignore=["HD102"]).findings} == full - {"HD102"}
    assert {f.code for f in higgs_diag.analyze(run_dir, select=["eval-loss-missing"]).findings} == {"HD101"}
    r = runner().invoke(main, ["analyze", str(run_dir), "--format", "json", "--select", "HD1", "--ignore", "HD101"])
    assert {f["code"] for f in json.loads(r.stdout)["findings"]} == {c for c in full if c.startswith("HD1")} - {"HD101"}
    cfg = tmp_path / "higgs.toml"
    cfg.write_text('ignore = ["HD101"]\n[thresholds]\naudio_loss_warning = 0.02\n')
    t, sel = load_config_file(cfg)
    assert t.audio_loss_warning == 0.02 and sel.ignore == ("HD101",)
    r = runner().invoke(main, ["analyze", str(run_dir), "--format", "json", "--config", str(cfg)])
    assert {f["code"] for f in json.loads(r.stdout)["findings"]} == full - {"HD101"}
    r = runner().invoke(main, ["analyze", str(run_dir), "--select", "HD9999"])
    assert r.exit_code == 2 and "matches no rule" in r.stderr
