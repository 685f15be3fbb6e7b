"""benchmarks/_proc.measure: the one fresh-process measurement (wall, cpu, peak RSS, exit code, output) that
bench_analyze, bench_growth, bench_triage, bench_run_memory and bench_replay share."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _proc  # noqa: E402


def test_exit_code_and_output():
    m = _proc.measure(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (m["rc"], m["stdout"], m["stderr"]) == (3, "out\n", "err\n")
    assert m["wall"] > 0 and m["cpu"] >= 0 and m["rss_mb"] > 0


def test_killed_by_a_signal_is_a_negative_exit_code():
    assert _proc.measure(["sh", "-c", "kill -TERM $$"])["rc"] == -15


def test_cwd_and_env():
    code = "import os; print(os.getcwd()); print(os.environ.get('HD_BENCH_PROBE'))"
    m = _proc.measure([sys.executable, "-c", code])
    assert m["stdout"].splitlines() == [str(_proc.REPO), "None"]  # the repository, the caller's environment
    m = _proc.measure([sys.executable, "-c", code], {**os.environ, "HD_BENCH_PROBE": "x"}, cwd=BENCH)
    assert m["stdout"].splitlines() == [str(BENCH), "x"]


def test_peak_rss_and_cpu_are_the_child_s():
    code = "b = bytearray(160 * 2**20); b[::4096] = b'x' * len(b[::4096]); sum(range(3_000_000))"
    m = _proc.measure([sys.executable, "-c", code])
    assert m["rc"] == 0, m["stderr"]
    assert 160 <= m["rss_mb"] < 1000
    assert m["cpu"] > 0.01 and m["wall"] >= m["cpu"] * 0.5


def test_output_larger_than_a_pipe_does_not_block():
    m = _proc.measure([sys.executable, "-c", "import sys; sys.stdout.write('x' * 300_000)"])
    assert m["rc"] == 0 and len(m["stdout"]) == 300_000


@pytest.mark.parametrize("name", ["bench_analyze", "bench_growth", "bench_triage", "bench_run_memory",
                                  "bench_replay"])
def test_the_benchmarks_use_the_one_helper(name):
    text = (BENCH / f"{name}.py").read_text()
    assert "os.wait4(" not in text and "from _proc import measure" in text


def test_batch_validation_reports_its_target():
    text = (BENCH / "bench_batch_validation.py").read_text()
    assert "from _targets import target" in text and "GOAL_SHARE = 0.02" in text  # docs/performance.md: < 2 %
