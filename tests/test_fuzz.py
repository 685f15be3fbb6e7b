"""Property-based fuzzing of every reader of user files: the state-file reader, the event reader, the console-log
reader, the args/model_config parser and the batch loader. Whatever the bytes, a reader returns (with read
problems) or raises its own one-line error; never another exception, never a value out of the limits.

Budget: ``HIGGS_DIAG_FUZZ_EXAMPLES`` examples per property (a few seconds each by default, for ``make test``);
``make fuzz`` runs the same properties with 20,000 each (100,000 inputs). The inputs that once crashed are in
``tests/fuzz_corpus/`` and run first (``@example``).
"""
from __future__ import annotations

import atexit
import functools
import io
import json
import math
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from higgs_diag import limits
from higgs_diag.run.events import _bounded_config_text, read_event_file, EventFileResult
from higgs_diag.run.trainer_state import read_trainer_state
from test_hostile import deadline, scalar_event, text_event

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
FUZZ = os.environ.get("HIGGS_DIAG_FUZZ_EXAMPLES")
EXAMPLES = int(FUZZ) if FUZZ else 40
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not FUZZ, database=None,
                         suppress_health_check=list(HealthCheck), print_blob=True)
_TMP = Path(tempfile.mkdtemp(prefix="higgs-diag-fuzz-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


# Each input's own memory: the peak RSS (VmHWM, reset through /proc/self/clear_refs before the reader runs) may
# rise at most this far above the RSS at its start. A reader that allocates from a size a file claims, or holds a
# copy per byte, fails here; hypothesis's own bookkeeping (its tree of the examples tried, ~0.1 MB an example of
# the state strategy, measured the same with the reader call removed) is outside the measured window. Where the
# peak cannot be reset (not Linux, a locked-down /proc) the bound is not checked.
INPUT_PEAK_LIMIT_MB = 64
peaks_mb: dict[str, float] = {}  # the largest rise seen per property, for the make fuzz summary


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {key} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_bounded(test):
    """Run the property's body with its peak memory measured (INPUT_PEAK_LIMIT_MB)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        try:
            before = _status_mb("VmRSS")
        except OSError:
            return test(*args, **kwargs)
        if not _reset_peak():
            return test(*args, **kwargs)
        out = test(*args, **kwargs)
        rise = _status_mb("VmHWM") - before
        peaks_mb[test.__name__] = max(peaks_mb.get(test.__name__, 0.0), rise)
        assert rise <= INPUT_PEAK_LIMIT_MB, f"one input took {rise:.0f} MB over the {before:.0f} MB it started at"
        return out
    return wrapper


@pytest.fixture(scope="module", autouse=True)
def _peak_summary(request):
    """After the properties: the largest per-input memory rise each one saw (printed; `make fuzz` shows it)."""
    yield
    if peaks_mb:
        line = "per-input peak memory rise, largest seen: " + ", ".join(
            f"{k.removeprefix('test_fuzz_')} {v:.1f} MB" for k, v in sorted(peaks_mb.items()))
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        if capture is not None and tr is not None:
            with capture.global_and_fixture_disabled():
                tr.write_line(f"\n{line} (limit {INPUT_PEAK_LIMIT_MB} MB)")


def test_the_memory_bound_catches_an_input_that_blows_up():
    if not (_reset_peak() and Path("/proc/self/status").exists()):
        pytest.skip("the peak RSS cannot be reset here")

    @memory_bounded
    def greedy():
        block = np.ones((INPUT_PEAK_LIMIT_MB + 64) * 2 ** 20 // 8)  # touched: resident
        return float(block[-1])

    with pytest.raises(AssertionError, match="one input took"):
        greedy()

    @memory_bounded
    def modest():
        return float(np.ones(2 ** 20 // 8)[-1])

    assert modest() == 1.0
    peaks_mb.pop("greedy", None), peaks_mb.pop("modest", None)


def _file(name: str, data: bytes) -> Path:
    p = _TMP / name
    p.write_bytes(data)
    return p


def corpus(folder: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / folder).iterdir())]


def with_corpus(folder: str):
    """``@example`` for every corpus file of ``folder`` (the crashes found before run first, every time)."""
    def deco(f):
        for data in corpus(folder):
            f = example(data)(f)
        return f
    return deco


# ------------------------------------------------------------------------------------------------------------
# JSON-ish text: valid JSON, extreme numbers, deep nesting, strings with brackets and escapes, then damage
# ------------------------------------------------------------------------------------------------------------
NUMBER = st.one_of(
    st.integers(-10 ** 20, 10 ** 20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e308", "-1e308", "1e999", "1e-999", "0", "-0", "1.5e+300"]),
    st.integers(1, 6000).map(lambda n: "9" * n),  # past Python's 4,300-digit limit
)
STRING = st.one_of(
    st.text(alphabet=st.sampled_from(list('ab"\\[]{}:,\n\x1b\x07\u00e9')), max_size=12).map(json.dumps),
    st.lists(st.sampled_from(["a", "[", "]", "{", "\\u0041", "\\\\", '\\"', "\\n", "\\ud800"]), max_size=8).map(
        lambda xs: '"' + "".join(xs) + '"'),  # escapes as they are in the text
)
KEY = st.sampled_from(["step", "loss", "eval_loss", "learning_rate", "grad_norm", "epoch", "lr", "train/loss",
                       "audio_loss", "text_loss", "global_step", "best_metric", "x" * 600, ""]).map(json.dumps)


def _nest(children):
    return st.one_of(
        st.lists(children, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(KEY, children), max_size=4).map(
            lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"),
    )


JSONISH = st.recursive(st.one_of(NUMBER, STRING, st.sampled_from(["true", "false", "null"])), _nest, max_leaves=20)
DEEP = st.tuples(st.integers(50, 3000), st.sampled_from(["[", "{\"a\": "])).map(lambda t: t[1] * t[0])


@st.composite
def state_text(draw) -> bytes:
    """A trainer_state.json: its fields and log_history entries from the strategies above, then maybe damaged."""
    n = draw(st.integers(0, 12))
    entries = []
    for i in range(n):
        kv = draw(st.lists(st.tuples(KEY, st.one_of(NUMBER, JSONISH)), max_size=5))
        if draw(st.booleans()):
            kv.insert(0, ('"step"', draw(st.one_of(st.integers(0, 10 ** 6).map(str), NUMBER))))
        entries.append("{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}")
    fields = draw(st.lists(st.tuples(st.sampled_from(['"global_step"', '"max_steps"', '"best_metric"',
                                                      '"logging_steps"', '"num_train_epochs"',
                                                      '"best_model_checkpoint"']), JSONISH), max_size=4))
    text = "{" + ", ".join([f"{k}: {v}" for k, v in fields] + ['"log_history": [' + ", ".join(entries) + "]"]) + "}"
    data = text.encode("utf-8", "surrogatepass")
    return draw(damaged(data))


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` as is, or cut off, with bytes flipped, with a run of nesting or garbage inserted."""
    how = draw(st.sampled_from(["as-is", "as-is", "cut", "flip", "insert-deep", "insert-bytes", "zero-run"]))
    if not data or how == "as-is":
        return data
    at = draw(st.integers(0, len(data)))
    if how == "cut":
        return data[:at]
    if how == "flip":
        i = min(at, len(data) - 1)
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if how == "insert-deep":
        return data[:at] + draw(DEEP).encode() + data[at:]
    if how == "zero-run":
        return data[:at] + bytes(draw(st.integers(1, 64))) + data[at:]
    return data[:at] + draw(st.binary(max_size=32)) + data[at:]


# ------------------------------------------------------------------------------------------------------------
# 1. the state-file reader
# ------------------------------------------------------------------------------------------------------------
@FUZZ_SETTINGS
@given(state_text())
@with_corpus("trainer_state")
@memory_bounded
def test_fuzz_trainer_state_reader(data):
    res = read_trainer_state(_file("trainer_state.json", data))
    assert len(res.steps) == len(res.metrics) == len(res.values)
    if len(res.steps):
        steps = np.asarray(res.steps)
        assert steps.dtype == np.int64 and np.abs(steps).max() <= limits.MAX_STEP
        assert np.asarray(res.values).dtype == np.float64
        assert all(isinstance(m, str) and len(m) <= limits.MAX_NAME_CHARS for m in res.metrics)
    if res.info is None:
        assert res.problems and any(p.fatal for p in res.problems)
    else:
        for key in ("global_step", "max_steps", "logging_steps", "eval_steps", "save_steps", "train_batch_size"):
            v = getattr(res.info, key)
            assert v is None or (isinstance(v, int) and abs(v) <= limits.MAX_STEP)
        bm = res.info.best_metric
        assert bm is None or isinstance(bm, float)
    for p in res.problems:
        str(p)


# ------------------------------------------------------------------------------------------------------------
# 2. the event reader (whole and in chunks: the same result)
# ------------------------------------------------------------------------------------------------------------
EVENT = st.one_of(
    st.builds(scalar_event, st.integers(0, 2 ** 62), st.sampled_from(["train/loss", "eval/loss", "train/lr", "x"]),
              st.floats(width=32, allow_nan=True)),
    st.builds(text_event, st.sampled_from(["args", "model_config", "other"]), JSONISH),
    st.binary(max_size=40),  # a record whose data is not an Event
)


@st.composite
def event_file(draw) -> bytes:
    from higgs_diag.run.tfrecord import frame_records

    return draw(damaged(frame_records(draw(st.lists(EVENT, max_size=25)))))


def _same(a: EventFileResult, b: EventFileResult) -> None:
    assert a.scalars.equals(b.scalars), (a.scalars, b.scalars)
    assert a.texts == b.texts and a.n_records == b.n_records and a.file_version == b.file_version


@FUZZ_SETTINGS
@given(event_file(), st.integers(1, 300))
@memory_bounded
def test_fuzz_event_reader(data, chunk):
    path = _file("events.out.tfevents.1.host.1.0", data)
    whole = read_event_file(path)
    assert list(whole.scalars.columns) == ["step", "tag", "value", "wall_time"]
    assert all(p.offset is None or 0 <= p.offset <= len(data) for p in whole.problems)
    assert not any("could not be decoded" in p.message for p in whole.problems), [str(p) for p in whole.problems]
    for tag in ("args", "model_config"):  # what the run loader parses: json.loads must not raise but JSONDecodeError
        if tag in whole.texts:
            try:
                obj = json.loads(whole.texts[tag])
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):  # the loader uses an object only
                _assert_config_in_range(obj)
    _same(whole, read_event_file(path, chunk=chunk))


def _assert_config_in_range(obj) -> None:
    if isinstance(obj, dict):
        for v in obj.values():
            _assert_config_in_range(v)
    elif isinstance(obj, list):
        for v in obj:
            _assert_config_in_range(v)
    elif isinstance(obj, float):
        assert math.isfinite(obj) and abs(obj) <= limits.MAX_CONFIG_NUMBER
    elif isinstance(obj, int) and not isinstance(obj, bool):
        assert abs(obj) <= limits.MAX_CONFIG_NUMBER


# ------------------------------------------------------------------------------------------------------------
# 3. the console-log reader (higgs_diag.run.logs.read_log)
# ------------------------------------------------------------------------------------------------------------
LOG_PIECES = st.sampled_from([
    "{'loss': 1.25, 'grad_norm': 0.5, 'learning_rate': 5e-05, 'epoch': 0.1}",
    "{'eval_loss': nan, 'eval_runtime': 1.0, 'epoch': 1.0}", "{'loss': inf, 'audio_loss': 1e999}",
    " 10%|█         | 20/200 [00:01<00:10, 9.5it/s]", "100%|██████████| 200/200 [00:20<00:00]",
    "Traceback (most recent call last):", '  File "train.py", line 1, in <module>',
    "KeyError: 'eval_loss'", "RuntimeError: CUDA out of memory", "[rank1]: Step 5 loss 0.3",
    "Step 99999999999999999999999 loss 1e309", "{'train_runtime': 1.0, 'train_loss': 0.5}",
    "Training completed.", "***** Running training *****", "  Total optimization steps = 99999999999999999999",
    "\x1b[2K\x1b]0;owned\x07", "\r", "\n", "\t", "\x00", "\udcff", "é", "x" * 70000, "{'loss': " + "9" * 5000 + "}",
])


@st.composite
def log_bytes(draw) -> bytes:
    parts = draw(st.lists(st.one_of(LOG_PIECES, st.text(max_size=20)), max_size=30))
    sep = draw(st.sampled_from(["\n", "\r\n", "\r", ""]))
    return draw(damaged(sep.join(parts).encode("utf-8", "surrogateescape")))


@FUZZ_SETTINGS
@given(log_bytes())
@with_corpus("logs")
@memory_bounded
def test_fuzz_console_log_reader(data):
    from higgs_diag.run.logs import read_log

    events, problems = read_log(_file("train.log", data))
    for e in events:
        assert isinstance(e.text, str) and e.line >= 1


# ------------------------------------------------------------------------------------------------------------
# 4. the args / model_config parser, then every check on the args it yields
# ------------------------------------------------------------------------------------------------------------
@st.composite
def config_text(draw) -> bytes:
    keys = st.sampled_from(["max_steps", "warmup_steps", "warmup_ratio", "logging_steps", "eval_steps",
                            "save_steps", "learning_rate", "lr_scheduler_type", "metric_for_best_model",
                            "load_best_model_at_end", "eval_strategy", "per_device_train_batch_size",
                            "gradient_accumulation_steps", "num_train_epochs", "audio_num_codebooks",
                            "audio_codebook_size", "max_grad_norm", "weight_decay", "seed"]).map(json.dumps)
    kv = draw(st.lists(st.tuples(keys, st.one_of(NUMBER, JSONISH)), max_size=8))
    text = "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"
    return draw(damaged(text.encode("utf-8", "surrogatepass")))


def _tiny_run(args: dict | None, config: dict | None):
    from higgs_diag.run.model import SCALAR_COLUMNS, Run

    steps = np.arange(1, 41, dtype=np.int64)
    cols = {"loss": 2.0 / steps, "learning_rate": 5e-5 * np.minimum(1, steps / 5), "eval_loss": 1.0 / steps,
            "grad_norm": np.ones(40)}
    df = pd.DataFrame({"step": np.tile(steps, len(cols)), "metric": np.repeat(list(cols), 40),
                       "value": np.concatenate(list(cols.values())), "source": "tensorboard", "wall_time": np.nan,
                       "file": "events", "segment": 0})[SCALAR_COLUMNS]
    run = Run(root="fuzz", scalars=df)
    run.args, run.model_config = args, config
    return run


@FUZZ_SETTINGS
@given(config_text())
@with_corpus("args")
@memory_bounded
def test_fuzz_config_parser_and_checks(data):
    from higgs_diag.checks import run_checks
    from higgs_diag.run.load import _parse_json_text

    text = data.decode("utf-8", "replace")
    res = EventFileResult(path="events", scalars=pd.DataFrame())
    bounded = _bounded_config_text("args", text, res)
    obj = None
    if bounded is not None:
        obj = _parse_json_text(bounded, "events", "args", res.problems)  # the run loader's own parser
    if obj is not None:
        _assert_config_in_range(obj)
    with np.errstate(all="ignore"):
        run_checks(_tiny_run(obj, obj))


# ------------------------------------------------------------------------------------------------------------
# 5. the batch loader
# ------------------------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def _saved(legacy: bool) -> bytes:
    buf = io.BytesIO()
    batch = {"input_ids": torch.arange(12).reshape(2, 6), "label_ids": torch.full((2, 6), -100),
             "_higgs_diag": {"step": 3, "losses": {"loss": 1.0}}}
    torch.save(batch, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


SAVED = {False: _saved(False), True: _saved(True)}


@st.composite
def batch_bytes(draw) -> bytes:
    data = SAVED[draw(st.booleans())]
    if draw(st.booleans()) and data.startswith(b"PK"):  # damage the pickle inside the archive, keep the zip sound
        src = zipfile.ZipFile(io.BytesIO(data))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            for info in src.infolist():
                raw = src.read(info)
                z.writestr(info, draw(damaged(raw)) if info.filename.endswith("data.pkl") else raw)
        return out.getvalue()
    return draw(damaged(data))


@FUZZ_SETTINGS
@given(batch_bytes())
@memory_bounded
def test_fuzz_batch_loader(data):
    import warnings

    from higgs_diag.batch import BatchError, load_batch

    try:
        with deadline(60), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tensors, meta = load_batch(_file("batch.pt", data))
    except BatchError as e:
        assert "\n" not in str(e) and "batch.pt" in str(e)
        return
    assert all(v.numel() <= limits.MAX_TENSOR_ELEMENTS for v in tensors.values())
