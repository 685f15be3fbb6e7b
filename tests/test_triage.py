"""Many runs at once: `higgs-diag analyze RUN_DIR...` and `higgs-diag analyze SWEEP_DIR` (a folder of run
folders) print a triage table, one line per run, analyzed in parallel; one bad run never stops the others;
the exit code is the worst outcome."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from higgs_diag.api import analyze_many, find_runs
from higgs_diag.cli import main
from _cli_util import runner

RUNS = Path(__file__).resolve().parents[1] / "fixtures" / "runs"


def _sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for name in ("healthy", "no-learning", "eval-loss-missing"):
        shutil.copytree(RUNS / name, sweep / name)
    (sweep / "empty").mkdir()  # not a run: ignored by the sweep
    bad = sweep / "broken"
    bad.mkdir()
    (bad / "trainer_state.json").write_text("this is not JSON")
    return sweep


def test_find_runs(tmp_path):
    sweep = _sweep(tmp_path)
    assert [p.name for p in find_runs(sweep)] == ["broken", "eval-loss-missing", "healthy", "no-learning"]
    assert find_runs(RUNS / "healthy") == [RUNS / "healthy"]  # a run is itself, not a sweep


def test_triage_table_parallel_and_worst_exit(tmp_path):
    sweep = _sweep(tmp_path)
    r = runner().invoke(main, ["analyze", str(sweep), "--jobs", "2"])
    assert r.exit_code == 2, r.stderr  # the unreadable run is the worst outcome
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("verdict") and len(lines) == 5
    assert lines[1].split()[0] == "critical" and lines[-1].split()[0] == "error"  # worst first, errors last
    assert any("no-learning" in ln and "HD401" in ln for ln in lines)
    assert any(ln.startswith("healthy") and "healthy" in ln for ln in lines)
    assert "4 runs: 2 critical, 0 warning, 1 healthy, 1 not analyzed" in r.stderr


def test_triage_json_lines_one_report_per_run(tmp_path):
    sweep = _sweep(tmp_path)
    shutil.rmtree(sweep / "broken")
    r = runner().invoke(main, ["analyze", str(sweep / "healthy"), str(sweep / "no-learning"), "--format", "json"])
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["verdict"] for d in docs] == ["healthy", "critical"] and r.exit_code == 1
    assert all(d["schema"] == "higgs-diag.report/1" for d in docs)


def test_triage_writes_a_report_per_run(tmp_path):
    sweep = _sweep(tmp_path)
    shutil.rmtree(sweep / "broken")
    out = tmp_path / "reports"
    r = runner().invoke(main, ["analyze", str(sweep), "-o", str(out), "--fail-on", "never"])
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["000-eval-loss-missing", "001-healthy", "002-no-learning"]
    assert (out / "002-no-learning" / "report.html").is_file()


def test_parallel_and_serial_agree(tmp_path):
    runs = [RUNS / n for n in ("healthy", "no-learning", "overfitting")]
    serial = [o["report"]["findings"] for o in analyze_many(runs, jobs=1)]
    parallel = [o["report"]["findings"] for o in analyze_many(runs, jobs=2)]
    assert serial == parallel


def test_default_jobs_follow_the_cpu_affinity_not_the_machine(monkeypatch):
    # pinned to one core (taskset, a batch scheduler's cgroup cpuset), the default is one process, not cpu_count()
    import os
    import pytest
    from higgs_diag import api

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert api.usable_cores() == 1
