"""Hostile and damaged input: no traceback, no hang, bounded memory, unreadable is never healthy, clean output.

Each case is an input an attack produced a traceback, a hang or a memory blow-up with; the small ones are kept
as files in ``tests/fuzz_corpus/`` (see its README), the others are built here (FIFOs, sparse files, symlinks,
pickles). The property-based fuzzing of the same readers is in ``tests/test_fuzz.py``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2

from _cli_util import runner
from higgs_diag import limits
from higgs_diag.api import analyze
from higgs_diag.cli import main
from higgs_diag.report import render
from higgs_diag.run import discover as discover_mod
from higgs_diag.run.events import read_event_file
from higgs_diag.run.tfrecord import frame_records
from higgs_diag.run.trainer_state import read_trainer_state, too_deep_at

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
FIXTURE = REPO / "fixtures" / "runs" / "eval-loss-missing"
FORMATS = ("text", "markdown", "json", "html")


# ------------------------------------------------------------------------------------------------------------
# helpers (also used by test_fuzz.py)
# ------------------------------------------------------------------------------------------------------------
@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def boom(*_):
        raise TimeoutError(f"took more than {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def scalar_event(step: int, tag: str, value: float, wall: float = 1_700_000_000.0) -> bytes:
    return event_pb2.Event(wall_time=wall, step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])).SerializeToString()


def text_event(tag: str, text: str, step: int = 0) -> bytes:
    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    tensor = tensor_pb2.TensorProto(dtype=7, string_val=[text.encode("utf-8", "surrogatepass")],
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
    return event_pb2.Event(wall_time=1_700_000_000.0, step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=f"{tag}/text_summary", metadata=meta, tensor=tensor)])).SerializeToString()


def event_run(folder: Path, texts: dict[str, str] | None = None, steps: int = 30) -> Path:
    """A logging folder with one event file: a loss and a learning rate per step, and text summaries."""
    recs = [event_pb2.Event(wall_time=1_700_000_000.0, file_version="brain.Event:2").SerializeToString()]
    recs += [text_event(tag, text) for tag, text in (texts or {}).items()]
    for s in range(1, steps + 1):
        recs.append(scalar_event(s, "train/loss", 2.0 / s))
        recs.append(scalar_event(s, "train/learning_rate", 5e-5 * min(1.0, s / 5)))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "events.out.tfevents.1700000000.host.1.0"
    path.write_bytes(frame_records(recs))
    return path


def analyze_every_format(run_dir: Path, **kw):
    """api.analyze, then every format rendered: the whole path a user's file takes. Returns the diagnosis."""
    diag = analyze(run_dir, **kw)
    for fmt in FORMATS:
        out = render(diag, fmt)
        assert not [c for c in out if ord(c) < 32 and c not in "\t\n"], f"raw control character in {fmt}"
        out.encode("utf-8")  # no lone surrogate
    return diag


def problems_text(diag) -> str:
    return "\n".join(diag.summary.get("problems", []))


def one_line_error(result) -> str:
    """The CLI's answer to bad input: exit 1/2 with findings or a one-line error, never 3 nor a traceback."""
    err = result.stderr if hasattr(result, "stderr") else ""
    assert result.exit_code in (0, 1, 2), (result.exit_code, err, result.output[-2000:])
    assert "Traceback" not in err and "internal error" not in err, err
    return err


# ------------------------------------------------------------------------------------------------------------
# 1. trainer_state.json: nesting, integers of 4,300+ digits, huge steps, values and best_metric
# ------------------------------------------------------------------------------------------------------------
STATE_CORPUS = sorted((CORPUS / "trainer_state").glob("*.json"))


@pytest.mark.parametrize("path", STATE_CORPUS, ids=lambda p: p.stem)
def test_state_corpus_is_read_with_problems_not_exceptions(path, tmp_path):
    res = read_trainer_state(path)
    if path.stem.startswith("backslashes"):  # valid, with brackets and escapes in strings: read as is
        assert [p.kind for p in res.problems] == ["non-numeric"] and list(res.metrics) == ["loss"]
        return
    assert res.problems, "an input out of the limits must be a read problem"
    assert all(abs(int(s)) <= limits.MAX_STEP for s in res.steps)
    assert len(res.steps) == len(res.metrics) == len(res.values)
    info = res.info
    if info is not None:
        for key in ("global_step", "max_steps", "logging_steps"):
            v = getattr(info, key)
            assert v is None or abs(v) <= limits.MAX_STEP
        assert info.best_metric is None or isinstance(info.best_metric, float)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "trainer_state.json")
    try:
        diag = analyze_every_format(run)
    except discover_mod.RunReadError as e:  # nothing usable: the one-line error of exit code 2
        assert "trainer_state.json" in str(e)
        return
    assert diag.verdict != "healthy"
    assert "trainer_state.json" in problems_text(diag)


def test_state_cases_name_what_is_wrong():
    def problems(name):
        return " | ".join(str(p) for p in read_trainer_state(CORPUS / "trainer_state" / name).problems)

    assert "nested deeper than 64 levels" in problems("deep-nesting.json")
    assert "the 1 log_history entries before it were used" in problems("deep-nesting-cut-off.json")
    assert "loss <a 5000-digit integer>" in problems("int-5000-digits.json")
    assert "global_step <a 5000-digit integer>" in problems("int-5000-digits-cut-off.json")
    assert "step 1e+300" in problems("step-huge.json")
    assert "global_step inf" in problems("global-step-infinity.json")
    assert "best_metric <a 400-digit integer>" in problems("best-metric-huge.json")
    assert "log_history key(s) longer than 512" in problems("long-key.json")
    res = read_trainer_state(CORPUS / "trainer_state" / "metric-value-huge.json")
    assert res.info.global_step == 2 and "loss <a 400-digit integer>" in problems("metric-value-huge.json")


def test_state_cli_exit_code_is_not_internal_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(CORPUS / "trainer_state" / "int-5000-digits-cut-off.json", run / "trainer_state.json")
    r = runner().invoke(main, ["analyze", str(run)])
    one_line_error(r)
    assert r.exit_code == 1 and "HD001" in r.output


def test_depth_scan_ignores_strings_and_escapes():
    assert too_deep_at(b'{"a": "[[[[[[", "b": "\\\\", "c": "\\"[[[["}', limit=1) is None
    assert too_deep_at(b'[[[', limit=2) == 2
    assert too_deep_at(b'["]", [[', limit=2) == 7


def test_state_file_size_limit(tmp_path, monkeypatch):
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"global_step": 1, "log_history": [{"step": 1, "loss": 1.0}] * 50}))
    monkeypatch.setattr(limits, "MAX_STATE_FILE_BYTES", 100)
    (prob,) = read_trainer_state(p).problems
    assert "over the 100-byte limit" in prob.message and prob.fatal


# ------------------------------------------------------------------------------------------------------------
# 1b. the args / model_config text summaries (deep nesting, huge integers, warmup_steps: Infinity)
# ------------------------------------------------------------------------------------------------------------
ARGS_CORPUS = sorted((CORPUS / "args").glob("*.json"))


@pytest.mark.parametrize("path", ARGS_CORPUS, ids=lambda p: p.stem)
def test_args_corpus_full_analysis(path, tmp_path):
    text = path.read_text()
    event_run(tmp_path / "run" / "runs" / "x", {"args": text, "model_config": text})
    diag = analyze_every_format(tmp_path / "run")
    if path.stem == "duplicate-key-hides-long-int":  # (found by the fuzzer) the later value wins: read, no problem
        assert diag.run.args == {"max_steps": 0}
        return
    assert "`args` text summary" in problems_text(diag)
    assert diag.verdict != "healthy"


def test_args_infinity_is_left_out_and_named(tmp_path):
    path = event_run(tmp_path / "runs", {"args": (CORPUS / "args" / "warmup-steps-infinity.json").read_text()})
    res = read_event_file(path)
    args = json.loads(res.texts["args"])
    assert args == {"max_steps": 100, "lr_scheduler_type": "linear", "learning_rate": 5e-5}
    assert any("warmup_steps inf" in p.message and "warmup_ratio nan" in p.message for p in res.problems)


# ------------------------------------------------------------------------------------------------------------
# 2. only regular files; bounded reads (FIFOs, devices, sparse files, symlinks out of the run)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trainer_state.json", "events.out.tfevents.1.host.1.0", "other.log"])
def test_fifo_named_like_a_run_file_does_not_hang(tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    sub = run / "runs" if "tfevents" in name else run
    sub.mkdir(exist_ok=True)
    os.mkfifo(sub / name)
    with deadline(60):
        diag = analyze_every_format(run)
    assert f"{name}: a FIFO (named pipe), not a regular file: not read" in problems_text(diag)
    assert diag.verdict != "healthy"


@pytest.mark.parametrize("reader", [read_trainer_state, read_event_file])
def test_readers_refuse_a_fifo_and_a_device_without_blocking(tmp_path, reader):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with deadline(20):
        for path, what in ((fifo, "a FIFO"), (Path("/dev/zero"), "a character device")):
            (p,) = reader(path).problems
            assert p.message.startswith(what) and p.fatal


def test_log_option_fifo_is_a_one_line_error(tmp_path):
    fifo = tmp_path / "train.log"
    os.mkfifo(fifo)
    with deadline(30):
        r = runner().invoke(main, ["analyze", str(FIXTURE), "--log", str(fifo)])
    assert r.exit_code == 2 and "a FIFO (named pipe), not a regular file" in one_line_error(r)


@pytest.mark.parametrize("name", ["trainer_state.json", "other.log", "events.out.tfevents.2.host.1.0"])
def test_symlink_out_of_the_run_is_not_followed(tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    (run / name).symlink_to("/dev/zero")
    with deadline(60):
        diag = analyze_every_format(run)
    assert f"{name}: a symlink to /dev/zero, outside the run folder: not read" in problems_text(diag)


def test_symlink_inside_the_run_is_read(tmp_path):
    run = _state_only_run(tmp_path)
    (run / "trainer_state.json").rename(run / "real_state.txt")
    (run / "trainer_state.json").symlink_to(run / "real_state.txt")
    diag = analyze(run)
    assert str(run / "trainer_state.json") in diag.summary["files_read"] and not diag.summary["problems"]


def test_sparse_event_file_is_not_allocated_whole(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host.1.0"
    with open(path, "wb") as fh:
        fh.truncate(64 * 1024 ** 3)  # 64 GiB of holes: no disk, but st_size says 64 GiB
    tracemalloc.start()
    t0 = time.perf_counter()
    res = read_event_file(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 30
    assert peak < 4 * limits.EVENT_READ_CHUNK_BYTES, peak
    (p,) = res.problems
    assert "not a TensorBoard event file" in p.message and p.fatal


def test_valid_records_then_a_hole_are_used(tmp_path):
    path = event_run(tmp_path, steps=50)
    good = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(good + 256 * 1024 ** 2)  # a copy that stopped: zeros after the records
    tracemalloc.start()
    res = read_event_file(path, chunk=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(res.scalars) == 100 and peak < 16 * 1024 ** 2
    (p,) = res.problems
    assert p.kind == "crc" and p.offset == good and "the 101 records before it were used" in p.message


def test_event_file_read_in_chunks_gives_the_same_result(tmp_path):
    path = event_run(tmp_path, {"args": '{"max_steps": 30}'}, steps=200)
    whole = read_event_file(path)
    for chunk in (1, 7, 64, 1000, 4096):
        part = read_event_file(path, chunk=chunk)
        assert part.scalars.equals(whole.scalars) and part.texts == whole.texts and not part.problems
        assert part.n_records == whole.n_records


def test_record_over_the_limit_stops_with_a_problem(tmp_path, monkeypatch):
    path = event_run(tmp_path, {"args": "x" * 5000}, steps=3)
    monkeypatch.setattr(limits, "MAX_EVENT_RECORD_BYTES", 1000)
    res = read_event_file(path, chunk=512)
    assert any("over the 1,000-byte limit" in p.message for p in res.problems)


# ------------------------------------------------------------------------------------------------------------
# 3. unreadable is never healthy
# ------------------------------------------------------------------------------------------------------------
def _state_only_run(tmp_path) -> Path:
    run = tmp_path / "run"
    (run / "runs").mkdir(parents=True)
    (run / "checkpoint-10").mkdir()
    steps = [{"step": s, "loss": 1.0 / s, "learning_rate": 5e-5, "grad_norm": 1.0} for s in range(1, 11)]
    state = {"global_step": 10, "max_steps": 10, "log_history": steps}
    (run / "trainer_state.json").write_text(json.dumps(state))
    (run / "checkpoint-10" / "trainer_state.json").write_text(json.dumps(state))
    event_run(run / "runs" / "x", steps=10)
    return run


def test_unlistable_folders_are_problems_not_silence(tmp_path, monkeypatch):
    run = _state_only_run(tmp_path)
    real = os.scandir

    def scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path).name in ("runs", "checkpoint-10"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(discover_mod.os, "scandir", scandir)
    diag = analyze_every_format(run)
    probs = problems_text(diag)
    assert f"{run / 'runs'}: folder cannot be listed (Permission denied)" in probs
    assert f"{run / 'checkpoint-10'}: folder cannot be listed (Permission denied)" in probs
    assert diag.verdict != "healthy" and any(f.code == "HD001" for f in diag.findings)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to drop to nobody")
def test_unreadable_folders_as_an_unprivileged_user(tmp_path):
    """chmod 000 folders, read as `nobody` (root reads everything): the verdict is not healthy."""
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="higgs-diag-nobody-", dir="/tmp"))
    run = _state_only_run(tmp_path)
    for p in [tmp_path, *tmp_path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (run / "runs").chmod(0)
    (run / "checkpoint-10").chmod(0)
    code = ("import os, sys, encodings.utf_8_sig, encodings.idna, encodings.ascii, encodings.latin_1\n"
            "import higgs_diag.cli as c, higgs_diag.api, higgs_diag.run.load, higgs_diag.run.events\n"
            "import higgs_diag.report.plots, higgs_diag.report.text\n"
            "from higgs_diag.checks import load_all; load_all()\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "c.main()\n")
    try:
        r = subprocess.run([sys.executable, "-c", code, "analyze", str(run), "--format", "json"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    finally:
        (run / "runs").chmod(0o755)
        (run / "checkpoint-10").chmod(0o755)
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert r.returncode == 1, r.stderr[-2000:]
    report = json.loads(r.stdout)
    probs = "\n".join(report["summary"]["problems"])
    assert "runs: folder cannot be listed (Permission denied)" in probs
    assert "checkpoint-10: folder cannot be listed (Permission denied)" in probs
    assert report["verdict"] != "healthy"


def test_unreadable_file_is_a_problem(tmp_path, monkeypatch):
    run = _state_only_run(tmp_path)
    real = limits._os.open

    def deny(path, *a, **kw):
        if str(path).endswith("tfevents.1700000000.host.1.0"):
            raise PermissionError(13, "Permission denied")
        return real(path, *a, **kw)

    monkeypatch.setattr(limits._os, "open", deny)
    diag = analyze(run)
    assert "cannot be opened: Permission denied" in problems_text(diag) and diag.verdict != "healthy"


def test_nothing_readable_is_exit_2_with_the_reason(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "runs").mkdir(parents=True)
    real = os.scandir
    monkeypatch.setattr(discover_mod.os, "scandir",
                        lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if isinstance(p, (str, os.PathLike)) and Path(p).name == "runs" else real(p))
    r = runner().invoke(main, ["analyze", str(run)])
    assert r.exit_code == 2 and "folder cannot be listed (Permission denied)" in one_line_error(r)


# ------------------------------------------------------------------------------------------------------------
# 4. batch files: inflation, tensor size, pickled code
# ------------------------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
from higgs_diag.batch import BatchError, load_batch  # noqa: E402


class _System:
    def __reduce__(self):
        return (os.system, ("touch /tmp/higgs_diag_hostile_pwned",))


def _deflated_zip_bomb(path: Path, inflated: int) -> Path:
    """A torch.save archive whose one storage is ``inflated`` zero bytes, deflated (torch stores, never deflates)."""
    numel = inflated // 4
    buf = io.BytesIO()
    torch.save({"input_ids": torch.zeros(4, dtype=torch.int32)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"K\x04", b"J" + numel.to_bytes(4, "little"), 2)  # numel and the size
            if info.filename.endswith("data/0"):
                with z.open(info.filename, "w", force_zip64=True) as out:
                    block = bytes(1 << 20)
                    for _ in range(inflated >> 20):
                        out.write(block)
                continue
            z.writestr(info.filename, data)
    return path


def test_batch_that_inflates_past_the_limit_is_refused_before_inflating(tmp_path, monkeypatch):
    bomb = _deflated_zip_bomb(tmp_path / "bomb.pt", 64 << 20)
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(limits, "MAX_BATCH_TENSOR_BYTES", 16 << 20)
    tracemalloc.start()
    with pytest.raises(BatchError, match="inflates to 67,1.*over the 16,777,216-byte limit"):
        load_batch(bomb)
    assert tracemalloc.get_traced_memory()[1] < 8 << 20
    tracemalloc.stop()


def test_batch_tensor_element_limit_catches_a_view(tmp_path):
    p = tmp_path / "view.pt"
    torch.save({"input_ids": torch.zeros(1, dtype=torch.long).expand(10 ** 9)}, p)
    with pytest.raises(BatchError, match="1,000,000,000 elements, over the limit"):
        load_batch(p)


def test_legacy_pickle_declaring_too_much_is_refused(tmp_path, monkeypatch):
    p = tmp_path / "legacy.pt"
    torch.save({"input_ids": torch.zeros(1000, dtype=torch.long)}, p, _use_new_zipfile_serialization=False)
    monkeypatch.setattr(limits, "MAX_BATCH_TENSOR_BYTES", 4000)
    with pytest.raises(BatchError, match="declares 8,000 bytes of tensor data"):
        load_batch(p)


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_pickled_code_is_named_not_called_damaged(tmp_path, kind):
    marker = Path("/tmp/higgs_diag_hostile_pwned")
    marker.unlink(missing_ok=True)
    p = tmp_path / "evil.pt"
    if kind == "raw":
        p.write_bytes(pickle.dumps({"input_ids": _System()}, protocol=2))
    else:
        buf = io.BytesIO()
        torch.save({"input_ids": torch.zeros(2)}, buf)
        src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
        with zipfile.ZipFile(p, "w") as z:
            for info in src.infolist():
                data = src.read(info)
                z.writestr(info, pickle.dumps({"x": _System()}, protocol=2) if info.filename.endswith("data.pkl")
                           else data)
    with pytest.raises(BatchError, match=r"holds pickled code \(os\.system\), not loaded"):
        load_batch(p)
    assert not marker.exists()


def test_pickled_global_with_control_characters_is_shown_on_one_line(tmp_path):
    """Found by the fuzzer: a damaged GLOBAL opcode (module "\\ncollections") made a two-line error."""
    buf = io.BytesIO()
    torch.save({"input_ids": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    p = tmp_path / "damaged.pt"
    with zipfile.ZipFile(p, "w") as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"ctorch._utils\n", b"c\n\x1btorch._utils\n", 1)
            z.writestr(info, data)
    with pytest.raises(BatchError, match="holds pickled code") as e:
        load_batch(p)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)


def test_batch_fifo_is_refused(tmp_path):
    fifo = tmp_path / "batch.pt"
    os.mkfifo(fifo)
    with deadline(20), pytest.raises(BatchError, match="a FIFO"):
        load_batch(fifo)


# ------------------------------------------------------------------------------------------------------------
# replay inputs: safetensors headers
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((CORPUS / "safetensors").glob("*.safetensors")), ids=lambda p: p.stem)
def test_safetensors_header_corpus_is_a_one_line_error(path):
    from higgs_diag.replay.errors import ReplayError
    from higgs_diag.replay.safetensors_header import read_header

    with pytest.raises(ReplayError) as e:
        read_header(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------------
# 5. output hygiene: control characters on every channel, names with newlines or undecodable bytes
# ------------------------------------------------------------------------------------------------------------
def _run_with_hostile_log(root: Path, name: bytes) -> Path:
    run = Path(os.fsdecode(bytes(root) + b"/" + name))
    shutil.copytree(FIXTURE, run)
    shutil.copy(CORPUS / "logs" / "escape-bel-in-traceback.log", run / "train.log")
    return run


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_on_stdout_escapes_log_control_characters(tmp_path, fmt):
    run = _run_with_hostile_log(tmp_path, b"run")
    r = subprocess.run([sys.executable, "-m", "higgs_diag.cli", "analyze", str(run), "--format", fmt,
                        "--color" if fmt == "text" else "--fail-on=warning"], capture_output=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    out = r.stdout.replace(b"\x1b[0m", b"").replace(b"\x1b[1m", b"").replace(b"\x1b[2m", b"")
    for seq in (b"\x1b[1;31m", b"\x1b[1;33m", b"\x1b[36m", b"\x1b[1;32m"):  # our own colours (text --color)
        out = out.replace(seq, b"")
    assert not [c for c in out if c < 32 and c not in (9, 10)], out[:3000]
    assert b"owned" in out and (b"x07" in out or b"\\u0007" in out)  # the log's text is there, escaped


def test_names_with_newlines_and_undecodable_bytes(tmp_path):
    run = _run_with_hostile_log(tmp_path, b"run\nVerdict: HEALTHY\xff")
    out_dir = Path(os.fsdecode(bytes(tmp_path) + b"/report\xfe"))
    r = subprocess.run([sys.executable, "-m", "higgs_diag.cli", "analyze", str(run), "-o", str(out_dir)],
                       capture_output=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    first, second = r.stdout.split(b"\n")[:2]
    assert first.endswith(b"/run\\x0aVerdict: HEALTHY\\xff") and second.startswith(b"Verdict: CRITICAL")
    for name in ("report.md", "report.html"):
        text = (out_dir / name).read_text("utf-8")
        assert "run\\x0aVerdict: HEALTHY\\xff" in text.replace("\\\\", "\\")
    report = json.loads((out_dir / "report.json").read_text("utf-8"))  # the data, undecodable byte escaped
    assert report["target"].endswith("run\nVerdict: HEALTHY\\xff")


# ------------------------------------------------------------------------------------------------------------
# 6. linear time for the state-file reader, whatever the step order or key layout
# ------------------------------------------------------------------------------------------------------------
def _history(n: int, layout: str) -> list[dict]:
    import random

    rnd = random.Random(n)
    steps = list(range(n))
    if layout != "sorted":
        rnd.shuffle(steps)
    if layout == "distinct-keys":
        return [{"step": s, f"metric_{i}": 1.0, "loss": 0.5} for i, s in enumerate(steps)]
    return [{"step": s, "loss": 1.0, "grad_norm": 2.0} for s in steps]


@pytest.mark.parametrize("layout", ["sorted", "shuffled", "distinct-keys"])
def test_state_reader_is_linear(tmp_path, layout):
    """Counted, not timed (the machine is shared): Python and C calls made while reading n and 4n entries."""
    calls = {}
    for n in (5_000, 20_000):
        p = tmp_path / f"{n}.json"
        p.write_text(json.dumps({"global_step": n, "log_history": _history(n, layout)}))
        calls[n] = _calls(read_trainer_state, p)
    assert calls[20_000] < 6 * calls[5_000], calls  # linear is 4x; quadratic would be 16x


def _calls(f, *a) -> int:
    n = 0

    def count(frame, event, arg):
        nonlocal n
        n += 1

    sys.setprofile(count)
    try:
        f(*a)
    finally:
        sys.setprofile(None)
    return n


# ------------------------------------------------------------------------------------------------------------
# replay inputs in modules owned elsewhere: the fix is described, the test waits for it (strict: it fails once
# fixed, so the marker is removed then)
# ------------------------------------------------------------------------------------------------------------
def test_replay_step_of_a_folder_whose_state_says_infinity(tmp_path):
    from higgs_diag.replay.checkpoint import step_of

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "trainer_state.json").write_text('{"global_step": Infinity, "log_history": []}')
    assert step_of(folder) is None


def test_replay_unreadable_batches_folder_is_a_one_line_error(tmp_path, monkeypatch):
    from higgs_diag.replay.batches import find_batch_files
    from higgs_diag.replay.errors import ReplayError

    folder = tmp_path / "batches"
    folder.mkdir()
    real = Path.iterdir

    def deny(self):
        if self == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", deny)
    with pytest.raises(ReplayError, match="batches"):
        find_batch_files([folder])
