"""A worker killed outright (the OOM killer's SIGKILL, a segfault in a C extension) while analyzing one run of
a sweep breaks the process pool; the other runs are still analyzed, in the order given, the dead run is
reported with the signal, no run is tried more than twice and no worker is left behind. Real pool, real
deaths: ``_work`` swaps the per-run function for one that kills its own worker on a marker file in the run."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest

from higgs_diag import api
from higgs_diag.api import _outcome, analyze_many
from higgs_diag.cli import main
from _cli_util import runner

RUNS = Path(__file__).resolve().parents[1] / "fixtures" / "runs"
KILL = "KILL_WORKER"  # in a run folder: its worker kills itself every time (a line per attempt is appended),
# with the signal named in the file (SIGKILL when empty)
KILL_ONCE = "KILL_WORKER_ONCE"  # removed, then the worker kills itself: the retry succeeds


def _killing(run_dir: str, options: dict, output: str | None = None) -> dict:
    """Runs in a spawned worker: dies by SIGKILL on a marker, else the real per-run analysis."""
    d = Path(run_dir)
    if (d / KILL).exists():
        sig = getattr(signal, (d / KILL).read_text().split("\n")[0] or "SIGKILL")
        with open(d / KILL, "a") as f:
            f.write(f"\n{os.getpid()}")
        os.kill(os.getpid(), sig)
    if (d / KILL_ONCE).exists():
        (d / KILL_ONCE).unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return _outcome(run_dir, options, output)


def _copy(tmp_path: Path, name: str, as_name: str | None = None, marker: str | None = None, sig: str = "") -> Path:
    dst = tmp_path / (as_name or name)
    shutil.copytree(RUNS / name, dst)
    if marker:
        (dst / marker).write_text(sig)
    return dst


def _attempts(run: Path) -> int:
    return len((run / KILL).read_text().split("\n")) - 1


def _no_workers_left() -> None:
    assert multiprocessing.active_children() == []
    # and by /proc (not only what multiprocessing tracks): no worker of ours (spawned or forked), alive or a zombie
    me = str(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = stat.rsplit(")", 1)[1].split()[1]
        assert not (ppid == me and "resource_tracker" not in cmd), f"worker {pid} left behind: {stat}"


@pytest.fixture(autouse=True, params=["fork", "spawn"])
def start_method(request, monkeypatch):
    """Every test with forked workers (the default in a single-threaded process) and with spawned ones."""
    monkeypatch.setattr(api, "_start_method", lambda: request.param)
    return request.param


def _findings(outcome: dict) -> list:
    return [(f["code"], f["severity"]) for f in outcome["report"]["findings"]]


def test_a_killed_worker_is_reported_and_every_other_run_is_analyzed(tmp_path):
    runs = [_copy(tmp_path, "healthy"), _copy(tmp_path, "no-learning", "victim", KILL),
            _copy(tmp_path, "no-learning"), _copy(tmp_path, "overfitting")]
    out = list(analyze_many(runs, jobs=2, _work=_killing))
    assert [o["run_dir"] for o in out] == [str(r) for r in runs]  # the order given
    victim = out[1]
    assert victim["report"] is None and victim["kind"] == "crashed"
    assert victim["error"].startswith(f"worker process killed by SIGKILL (out of memory?) while analyzing {runs[1]}")
    assert _attempts(runs[1]) == 2  # in the pool, then once alone: never again
    expected = [_outcome(str(r), {}) for r in (RUNS / "healthy", RUNS / "no-learning", RUNS / "overfitting")]
    for got, want in zip((out[0], out[2], out[3]), expected):
        assert got["kind"] is None and got["error"] is None
        assert _findings(got) == _findings(want) and got["report"]["verdict"] == want["report"]["verdict"]
    _no_workers_left()


def test_two_runs_killing_their_workers_side_by_side_are_each_tried_twice_not_more(tmp_path):
    # both in flight when the pool breaks, and again in the fresh pool: each retried alone, once
    runs = [_copy(tmp_path, "healthy", "a", KILL), _copy(tmp_path, "healthy", "b", KILL, "SIGTERM"),
            _copy(tmp_path, "no-learning")]
    out = list(analyze_many(runs, jobs=2, _work=_killing))
    assert [o["run_dir"] for o in out] == [str(r) for r in runs]
    assert [o["kind"] for o in out] == ["crashed", "crashed", None]
    assert "killed by SIGKILL (out of memory?)" in out[0]["error"]
    assert "killed by SIGTERM while analyzing" in out[1]["error"]
    assert all(1 <= _attempts(r) <= 2 for r in runs[:2])  # 1 when the pool broke before it started
    assert out[2]["report"]["verdict"] == "critical"
    _no_workers_left()


def test_a_run_that_killed_its_worker_once_is_retried_and_analyzed(tmp_path):
    runs = [_copy(tmp_path, "no-learning", marker=KILL_ONCE), _copy(tmp_path, "healthy")]
    out = list(analyze_many(runs, jobs=2, _work=_killing))
    assert not (runs[0] / KILL_ONCE).exists()  # it did die once
    assert [o["kind"] for o in out] == [None, None]
    assert out[0]["report"]["verdict"] == "critical" and out[1]["report"]["verdict"] == "healthy"
    _no_workers_left()


def test_the_cli_reports_a_dead_worker_as_worker_died_exit_3(tmp_path, monkeypatch):
    runs = [_copy(tmp_path, "healthy"), _copy(tmp_path, "no-learning", "victim", KILL)]
    monkeypatch.setattr(api, "_outcome", _killing)  # the workers import the module afresh: _killing is pickled
    r = runner().invoke(main, ["analyze", *map(str, runs), "--jobs", "2"])
    assert r.exit_code == 3, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[1].startswith("healthy") and lines[2].startswith("worker-died")
    assert "worker process killed by SIGKILL" in lines[2] and "victim" in lines[2]
    assert "2 runs: 0 critical, 0 warning, 1 healthy, 1 not analyzed" in r.stderr
    _no_workers_left()


def _read_worker_setting(run_dir: str, options: dict, output: str | None = None) -> dict:
    """Runs in a worker: reports the forked-reader setting it sees, as its error text."""
    return {"run_dir": run_dir, "report": None, "error": os.environ.get("HIGGS_DIAG_READ_WORKER"), "kind": "internal"}


def test_workers_read_their_runs_serially(tmp_path, monkeypatch):
    """Every core is busy with a run of its own: no worker forks a second reader (HIGGS_DIAG_READ_WORKER=0 in
    the pool's workers and in a retry's own process), whatever this process has."""
    monkeypatch.delenv("HIGGS_DIAG_READ_WORKER", raising=False)
    runs = [_copy(tmp_path, "healthy"), _copy(tmp_path, "no-learning")]
    assert [o["error"] for o in analyze_many(runs, jobs=2, _work=_read_worker_setting)] == ["0", "0"]
    ctx = multiprocessing.get_context("spawn")
    assert api._alone(ctx, _read_worker_setting, (str(runs[0]), {}, None))["error"] == "0"
    assert os.environ.get("HIGGS_DIAG_READ_WORKER") is None  # this process is untouched
    _no_workers_left()


def test_workers_are_forked_from_a_single_threaded_process_and_spawned_otherwise(tmp_path):
    """In a fresh interpreter (one thread) the pool forks; once another thread runs, it spawns."""
    import subprocess
    import sys

    code = ("import os, threading, time\n"
            "os.environ['OPENBLAS_NUM_THREADS'] = '1'  # as the CLI asks; numpy's default pool is a thread\n"
            "from higgs_diag import api\n"
            "a = api._start_method()\n"
            "threading.Thread(target=time.sleep, args=(1,), daemon=True).start()\n"
            "print(a, api._start_method())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["fork", "spawn"], out.stderr


def test_a_single_thread_is_counted_with_the_native_ones():
    """numpy's OpenBLAS pool is an operating-system thread that threading does not list: it forbids a fork."""
    import subprocess
    import sys

    if (os.cpu_count() or 1) < 2:
        pytest.skip("OpenBLAS starts no second thread on one core")

    code = ("import os\nos.environ['OPENBLAS_NUM_THREADS'] = os.environ['N']\nimport numpy, threading\n"
            "from higgs_diag.procs import single_threaded\nprint(threading.active_count(), single_threaded())\n")
    one = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "N": "1"})
    two = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "N": "2"})
    assert one.stdout.split() == ["1", "True"], one.stderr
    assert two.stdout.split() == ["1", "False"], two.stderr


def test_the_pool_starts_its_workers_the_way_start_method_says(tmp_path, monkeypatch, start_method):
    import multiprocessing

    asked = []
    real = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda m=None: asked.append(m) or real(m))
    runs = [_copy(tmp_path, "healthy"), _copy(tmp_path, "no-learning")]
    assert [o["kind"] for o in analyze_many(runs, jobs=2)] == [None, None]
    assert asked == [start_method]
    _no_workers_left()
