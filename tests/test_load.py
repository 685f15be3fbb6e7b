"""higgs_diag.run.load: the scalars frame (compact column types, segments, several files merged) and reading the
event files in a forked worker while the state files are read (same Run as serial, errors as serial)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2

import higgs_diag.run.load as load
import higgs_diag.run.read_worker as read_worker
from higgs_diag.run.events import frame_records
from higgs_diag.run.model import SCALAR_COLUMNS, STEP_INT32_LIMIT


# ------------------------------------------------------------------------------------------------------------
# helpers: a run with a state file, an event file and a console log, steps going back where asked
# ------------------------------------------------------------------------------------------------------------
def _event(step, tag, value, wall):
    return event_pb2.Event(wall_time=wall, step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])).SerializeToString()


def _write_run(root: Path, steps: list[int], *, tags=("train/loss", "train/grad_norm", "eval/loss"),
               log: bool = True, seed: int = 0) -> Path:
    """trainer_state.json (the steps in the order given), an event file (the same points, tags shuffled within
    a step) and a console log printing `Step N - Losses` lines."""
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    history = [{"step": s, "loss": rnd.random(), "grad_norm": rnd.random() * 3} for s in steps]
    history += [{"step": s, "eval_loss": rnd.random()} for s in steps[::7]]
    (root / "trainer_state.json").write_text(json.dumps({"global_step": max(steps), "log_history": history}))
    recs = []
    for i, s in enumerate(steps):
        for tag in rnd.sample(list(tags), len(tags)):
            recs.append(_event(s, tag, rnd.random(), 1_700_000_000.0 + i + rnd.random()))
    tb = root / "runs" / "x"
    tb.mkdir(parents=True, exist_ok=True)
    (tb / "events.out.tfevents.1700000000.host.1.0").write_bytes(frame_records(recs))
    if log:
        lines = [f"INFO:__main__:Step {s} - Losses: Text={rnd.random():.4f}, Audio={rnd.random():.4f}, "
                 f"Total={rnd.random():.4f}" for s in steps]
        (root / "train.log").write_text("\n".join(lines) + "\n")
    return root


def _naive_frame(run) -> pd.DataFrame:
    """The frame the loader builds, computed the plain way from its own columns: segments recounted per
    (file, metric) with a Python loop over the points in reading order."""
    df = run.scalars
    seg = np.zeros(len(df), dtype=np.int64)
    last: dict = {}
    count: dict = {}
    for i, (f, m, s) in enumerate(zip(df["file"].astype(object), df["metric"].astype(object), df["step"])):
        key = (f, m)
        if key in last and s < last[key]:
            count[key] = count.get(key, 0) + 1
        last[key] = s
        seg[i] = count.get(key, 0)
    return pd.DataFrame({"step": df["step"].to_numpy(np.int64), "segment": seg})


def _assert_same_run(a, b):
    assert list(a.scalars.columns) == list(b.scalars.columns) == SCALAR_COLUMNS
    for col in SCALAR_COLUMNS:
        x, y = a.scalars[col], b.scalars[col]
        assert x.dtype == y.dtype, col
        if x.dtype.kind == "f":
            assert np.array_equal(x.to_numpy().view(np.int64), y.to_numpy().view(np.int64)), col  # bit-identical
        else:
            assert x.astype(object).tolist() == y.astype(object).tolist(), col
    assert [str(p) for p in a.problems] == [str(p) for p in b.problems]
    assert (a.files_read, a.args, a.model_config, a.state) == (b.files_read, b.args, b.model_config, b.state)


# ------------------------------------------------------------------------------------------------------------
# the frame
# ------------------------------------------------------------------------------------------------------------
def test_frame_is_compact_and_exact(tmp_path):
    steps = list(range(1, 301)) + list(range(150, 401)) + list(range(1, 51))  # a resume, then a restart
    run = load.load_run(_write_run(tmp_path / "r", steps))
    df = run.scalars
    assert df["step"].dtype == np.int32 and df["segment"].dtype == np.int8
    assert df["value"].dtype == np.float64 and df["wall_time"].dtype == np.float64
    for col in ("metric", "source", "file"):
        assert isinstance(df[col].dtype, pd.CategoricalDtype) and df[col].cat.codes.dtype == np.int8
        assert df[col].cat.categories.dtype == object
    per_point = sum((df[c].cat.codes if isinstance(df[c].dtype, pd.CategoricalDtype) else df[c]).dtype.itemsize
                    for c in SCALAR_COLUMNS)
    assert per_point == 24  # 4 + 1 + 8 + 1 + 8 + 1 + 1 (was 35: int64 step and segment)
    assert set(df["source"].astype(str)) == {"trainer_state", "tensorboard", "console"}
    # the segments: 0, 1, 2 in every (file, metric) that has the three sessions
    naive = _naive_frame(run)
    assert np.array_equal(df["segment"].to_numpy(np.int64), naive["segment"].to_numpy())
    assert df["segment"].max() == 2
    loss = run.series("loss")
    assert loss.index.dtype == np.int64 and loss.index.tolist() == list(range(1, 401))


def test_steps_beyond_int32_stay_int64(tmp_path):
    big = STEP_INT32_LIMIT  # just outside the int32 range the loader uses
    run = load.load_run(_write_run(tmp_path / "r", [1, 2, big, big + 5, 3], log=False))
    assert run.scalars["step"].dtype == np.int64
    assert run.scalars["step"].max() == big + 5 and run.series("loss").index.tolist() == [1, 2, 3, big, big + 5]
    small = load.load_run(_write_run(tmp_path / "s", [1, 2, big - 1, 3], log=False))
    assert small.scalars["step"].dtype == np.int32 and small.scalars["step"].max() == big - 1


def test_many_metrics_and_many_segments(tmp_path):
    """More than 126 metric names (int16 codes) and more than 127 resumes (int16 segments)."""
    tags = tuple(f"train/m{i}" for i in range(150))
    steps = [s for _ in range(130) for s in (1, 2)]  # goes back 129 times
    run = load.load_run(_write_run(tmp_path / "r", steps, tags=tags, log=False))
    df = run.scalars
    assert df["metric"].cat.codes.dtype == np.int16 and df["segment"].dtype == np.int16
    assert np.array_equal(df["segment"].to_numpy(np.int64), _naive_frame(run)["segment"].to_numpy())
    assert int(df["segment"].max()) == 129


@pytest.mark.parametrize("seed", range(6))
def test_segments_match_the_plain_count(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 3000))
    step = rng.integers(-5, 40, n).astype(np.int64) if seed % 2 else np.sort(rng.integers(0, 10**6, n))
    codes = rng.integers(-1, 5 if seed < 4 else 40_000, n)  # -1: a missing name; 40,000: int64 keys
    got = load._segments(step, codes, int(codes.max(initial=0)) + 1)
    want = np.zeros(n, dtype=np.int64)
    last, count = {}, {}
    for i, (c, s) in enumerate(zip(codes.tolist(), step.tolist())):
        if c in last and s < last[c]:
            count[c] = count.get(c, 0) + 1
        last[c] = s
        want[i] = count.get(c, 0)
    if got is None:
        assert not want.any()
    else:
        assert np.array_equal(got, want)


def test_assemble_keeps_category_order_and_lets_parts_go():
    """Metric categories in order of appearance over the files (as pandas.union_categoricals does), each
    file's arrays released once copied."""
    def part(names, codes, steps, source, file):
        return {"step": np.asarray(steps, np.int64),
                "metric": pd.Categorical.from_codes(np.asarray(codes), categories=pd.Index(names, dtype=object)),
                "value": np.arange(len(steps), dtype=np.float64), "wall_time": None, "source": source,
                "file": file}

    parts = [part(["b", "a"], [0, 1, 1], [1, 2, 3], "trainer_state", "s.json"),
             part(["c", "a", "b"], [2, 0, 1, 0], [5, 4, 3, 2], "tensorboard", "e1"),
             part(["a"], [0], [9], "tensorboard", "e2")]
    df = load._assemble(parts)
    assert parts == []
    assert list(df["metric"].cat.categories) == ["b", "a", "c"]
    assert df["metric"].astype(str).tolist() == ["b", "a", "a", "b", "c", "a", "c", "a"]
    assert df["segment"].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]  # c: steps 4 then 2 in e1
    assert df["source"].astype(str).tolist() == ["trainer_state"] * 3 + ["tensorboard"] * 5
    assert list(df["source"].cat.categories) == ["trainer_state", "tensorboard"]
    assert df["file"].astype(str).tolist() == ["s.json"] * 3 + ["e1"] * 4 + ["e2"]
    assert df["wall_time"].isna().all() and df["value"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert load._assemble([]).columns.tolist() == SCALAR_COLUMNS


# ------------------------------------------------------------------------------------------------------------
# reading the event files in a forked worker
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def always_concurrent(monkeypatch):
    monkeypatch.setattr(read_worker, "CONCURRENT_MIN_BYTES", 0)
    monkeypatch.setattr(read_worker, "single_threaded", lambda: True)  # the test process may have BLAS threads
    monkeypatch.setattr(read_worker, "usable_cores", lambda: 2)
    monkeypatch.setenv(read_worker.READ_WORKER_ENV, "1")
    started = []
    orig = read_worker.EventWorker.start.__func__

    def start(cls, files, size):
        w = orig(cls, files, size)
        started.append(w)
        return w

    monkeypatch.setattr(read_worker.EventWorker, "start", classmethod(start))
    return started


def _serial(monkeypatch, root):
    with monkeypatch.context() as m:
        m.setenv(read_worker.READ_WORKER_ENV, "0")
        return load.load_run(root)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_worker_gives_the_serial_run(tmp_path, monkeypatch, always_concurrent):
    root = _write_run(tmp_path / "r", list(range(1, 200)) + list(range(50, 120)))
    tb2 = root / "runs" / "y"  # a second event file, cut off in its last record
    tb2.mkdir()
    data = frame_records([_event(s, "train/loss", 0.5, 1.7e9 + s) for s in range(300, 340)])
    (tb2 / "events.out.tfevents.1700000100.host.1.0").write_bytes(data[:-7])
    ticks = []
    run = load.load_run(root, progress=ticks.append)
    assert len(always_concurrent) == 1 and always_concurrent[0] is not None
    assert always_concurrent[0].pid is None  # reaped
    serial = _serial(monkeypatch, root)
    _assert_same_run(run, serial)
    assert any("truncated" == p.kind for p in run.problems)
    assert sorted(ticks) == sorted(p.stat().st_size for p in [*root.rglob("trainer_state.json"),
                                                              *root.rglob("events.out.*"), root / "train.log"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_worker_failure_reads_again_here(tmp_path, monkeypatch, always_concurrent):
    """A child that dies (here: its reader raises) delivers nothing: the files are read again in this process,
    where the same reader error surfaces exactly as it does serially."""
    root = _write_run(tmp_path / "r", list(range(1, 50)), log=False)
    calls = []
    real = read_worker._send_results

    def dying(fd, results):
        os._exit(3)  # in the child: as if it crashed before sending anything

    monkeypatch.setattr(read_worker, "_send_results", dying)
    run = load.load_run(root)
    assert always_concurrent[0] is not None and always_concurrent[0].pid is None
    monkeypatch.setattr(read_worker, "_send_results", real)
    _assert_same_run(run, _serial(monkeypatch, root))

    import higgs_diag.run.events as events

    def broken(p, chunk=None):
        calls.append(os.getpid())
        raise RuntimeError("reader bug")

    monkeypatch.setattr(events, "read_event_file", broken)
    with pytest.raises(RuntimeError, match="reader bug"):
        load.load_run(root)
    assert calls and calls[-1] == os.getpid()  # raised here, after the child failed the same way


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_the_worker_is_the_default_and_reads_serially_when_it_cannot_help(tmp_path, monkeypatch):
    root = _write_run(tmp_path / "r", list(range(1, 30)), log=False)
    started = []
    orig = read_worker.EventWorker.start.__func__
    monkeypatch.setattr(read_worker.EventWorker, "start",
                        classmethod(lambda cls, f, s: started.append(orig(cls, f, s)) or started[-1]))
    monkeypatch.setattr(read_worker, "CONCURRENT_MIN_BYTES", 0)
    monkeypatch.setattr(read_worker, "usable_cores", lambda: 2)
    monkeypatch.setattr(read_worker, "single_threaded", lambda: True)
    monkeypatch.delenv(read_worker.READ_WORKER_ENV, raising=False)
    load.load_run(root)  # the default: forked
    assert started[-1] is not None and started[-1].pid is None  # started and reaped
    for off in ("0", "off", " False "):
        monkeypatch.setenv(read_worker.READ_WORKER_ENV, off)
        load.load_run(root)  # turned off
    monkeypatch.delenv(read_worker.READ_WORKER_ENV)
    monkeypatch.setattr(read_worker, "usable_cores", lambda: 1)
    load.load_run(root)  # one core: nothing to overlap on
    monkeypatch.setattr(read_worker, "usable_cores", lambda: 2)
    monkeypatch.setattr(read_worker, "single_threaded", lambda: False)
    load.load_run(root)  # another thread runs: a fork could deadlock
    monkeypatch.setattr(read_worker, "single_threaded", lambda: True)
    monkeypatch.setattr(read_worker, "CONCURRENT_MIN_BYTES", 1 << 20)
    load.load_run(root)  # files of a few KB: below CONCURRENT_MIN_BYTES
    monkeypatch.setattr(read_worker, "CONCURRENT_MIN_BYTES", 0)
    monkeypatch.setattr(read_worker, "CONCURRENT_MAX_BYTES", 100)
    load.load_run(root)  # the event file over CONCURRENT_MAX_BYTES: the two processes' memory would add up
    monkeypatch.setattr(read_worker, "CONCURRENT_MAX_BYTES", 1 << 30)
    (root / "trainer_state.json").unlink()
    load.load_run(root)  # only an event file: nothing to overlap
    assert started[1:] == [None] * 8


# The forked reader's process hygiene, each in a fresh interpreter (single-threaded, as the CLI is; the test
# process has BLAS threads): the reader never outlives what started it, and never holds the caller's pipes.
_HYGIENE_PRELUDE = """
import os, signal, sys, time
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ.pop("HIGGS_DIAG_READ_WORKER", None)
import higgs_diag.run.load as load
import higgs_diag.run.read_worker as read_worker
import higgs_diag.run.events as events
read_worker.CONCURRENT_MIN_BYTES = 0
read_worker.usable_cores = lambda: 2
root = sys.argv[1]
"""


def _children(pid: int) -> list[int]:
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(int(d))
        except (OSError, IndexError):
            continue
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_an_interrupt_just_after_the_fork_leaves_no_child_and_no_pipe(tmp_path):
    """Ctrl-C landing right after fork() returns in the parent (a trace hook raises KeyboardInterrupt at the first
    line that sees the child's pid, as a signal could): the child is killed and reaped, both pipe ends closed."""
    import subprocess
    import sys

    root = _write_run(tmp_path / "r", list(range(1, 40)), log=False)
    script = _HYGIENE_PRELUDE + """
parent = os.getpid()
code = read_worker.EventWorker.start.__func__.__code__
def tracer(frame, event, arg):
    if frame.f_code is not code:
        return None
    def local(frame, event, arg):
        if event == "line" and os.getpid() == parent and frame.f_locals.get("pid"):
            raise KeyboardInterrupt
        return local
    return local
fds = set(os.listdir("/proc/self/fd"))
sys.settrace(tracer)
try:
    load.load_run(root)
    print("no interrupt")
except KeyboardInterrupt:
    print("interrupted")
sys.settrace(None)
kids = [d for d in os.listdir("/proc") if d.isdigit() and os.path.exists(f"/proc/{d}/stat")
        and open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1] == str(parent)]
print("children", len(kids), "leaked", len(set(os.listdir("/proc/self/fd")) - fds))
"""
    out = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["interrupted", "children", "0", "leaked", "0"], out.stdout + out.stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_the_reader_dies_with_its_parent_and_never_holds_its_output(tmp_path):
    """The parent killed outright (the OOM killer, a timeout's SIGKILL) while its reader works: whoever reads the
    parent's stdout sees EOF at once (the reader's stdout is /dev/null), and the reader is gone too."""
    import signal
    import subprocess
    import sys
    import time

    root = _write_run(tmp_path / "r", list(range(1, 40)), log=False)
    script = _HYGIENE_PRELUDE + """
real = events.read_event_file
def slow(path, *a, **k):
    time.sleep(60)
    return real(path, *a, **k)
events.read_event_file = slow
from higgs_diag.run.discover import discover
worker = read_worker.EventWorker.start(discover(root), load._size)
print(worker.pid, flush=True)
time.sleep(0.5)  # the reader is in its sleep
os.kill(os.getpid(), signal.SIGKILL)
"""
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=30)  # EOF on both pipes: nobody else holds them
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL, err
    assert time.monotonic() - t < 30
    child = int(out.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # re-parented to init, which reaps it once it died
    assert not Path(f"/proc/{child}").exists(), "the reader outlived its parent"
