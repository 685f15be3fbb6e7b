"""higgs_diag.run.events: our TensorBoard event file reader (framing, CRC32C, fast path, problems)."""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as tb_crc32c
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked_crc32c
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from higgs_diag.run import bytebuf, tfrecord
from higgs_diag.run import events as ev
from higgs_diag.run.events import (
    EventFileResult,
    crc32c,
    crc32c_segments,
    frame_records,
    is_event_file,
    masked_crc32c,
    read_event_file,
)

CORPUS = Path("/work/shared/corpus/tensorboard")
N_EXAMPLES = int(os.environ.get("HIGGS_DIAG_HYPOTHESIS_EXAMPLES", "60"))  # raise it for a long fuzzing run
HYP = settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def scalar_event(step, tag, value, wall=1_700_000_000.25):
    return event_pb2.Event(wall_time=wall, step=step,
                           summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)]))


def text_event(tag, text, wall=1_700_000_000.5, plugin=True):
    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    v = summary_pb2.Summary.Value(
        tag=tag, tensor=tensor_pb2.TensorProto(dtype=7, string_val=[text.encode()],
                                               tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                                   dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)])))
    if plugin:
        v.metadata.CopyFrom(meta)
    return event_pb2.Event(wall_time=wall, summary=summary_pb2.Summary(value=[v]))


def write_with_tensorboard(logdir: Path, events) -> Path:
    """tensorboard's own EventFileWriter (adds the file_version record first)."""
    w = EventFileWriter(str(logdir))
    for e in events:
        w.add_event(e)
    w.close()
    files = glob.glob(str(logdir / "events.out.tfevents.*"))
    assert len(files) == 1
    return Path(files[0])


def write_raw(path: Path, events) -> Path:
    path.write_bytes(frame_records([e.SerializeToString() if not isinstance(e, bytes) else e for e in events]))
    return path


def f32(x: float) -> float:
    return float(np.float32(x))


def bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).view(np.uint64)


def reference_read(path) -> dict:
    """An independent, slow, obviously-correct reader: sequential framing, tensorboard's pure-Python
    masked CRC32C, protobuf parsing. Returns points, texts, problems [(kind, offset)], n_records."""
    data = Path(path).read_bytes()
    n = len(data)
    out = {"points": [], "texts": {}, "problems": [], "n_records": 0, "file_version": None}
    if n == 0:
        out["problems"].append(("empty", 0))
        return out
    if data.startswith(b"version https://git-lfs.github.com/spec/"):
        out["problems"].append(("lfs-pointer", 0))
        return out
    pos = 0
    while pos < n:
        if n - pos < 12:
            out["problems"].append(("truncated", pos))
            break
        (L,) = struct.unpack_from("<Q", data, pos)
        (hc,) = struct.unpack_from("<I", data, pos + 8)
        if tb_masked_crc32c(data[pos:pos + 8]) != hc:
            out["problems"].append(("unreadable" if pos == 0 else "crc", pos))
            break
        if pos + 16 + L > n:
            out["problems"].append(("truncated", pos))
            break
        payload = data[pos + 12:pos + 12 + L]
        (dc,) = struct.unpack_from("<I", data, pos + 12 + L)
        if tb_masked_crc32c(payload) != dc:
            out["problems"].append(("crc", pos))
            pos += 16 + L
            continue
        try:
            e = event_pb2.Event.FromString(payload)
        except Exception:
            out["problems"].append(("unreadable", pos))
            pos += 16 + L
            continue
        out["n_records"] += 1
        if e.WhichOneof("what") == "file_version" and out["file_version"] is None:
            out["file_version"] = e.file_version
        for v in e.summary.value:
            kind = v.WhichOneof("value")
            if kind == "simple_value":
                out["points"].append((e.step, v.tag, float(v.simple_value), e.wall_time))
            elif kind == "tensor":
                plugin = v.metadata.plugin_data.plugin_name
                if v.tensor.dtype == 7 and (plugin == "text" or v.tag.endswith("/text_summary")):
                    tag = v.tag[:-len("/text_summary")] if v.tag.endswith("/text_summary") else v.tag
                    out["texts"][tag] = "\n".join(s.decode("utf-8", "replace") for s in v.tensor.string_val)
                elif plugin in ("", "scalars") and v.tensor.dtype in (1, 2) and \
                        math.prod(d.size for d in v.tensor.tensor_shape.dim) == 1:
                    vals = v.tensor.float_val if v.tensor.dtype == 1 else v.tensor.double_val
                    if v.tensor.tensor_content:
                        val = float(np.frombuffer(v.tensor.tensor_content, "<f4" if v.tensor.dtype == 1 else "<f8")[0])
                    else:
                        val = float(vals[-1]) if len(vals) else 0.0
                    out["points"].append((e.step, v.tag, val, e.wall_time))
        pos += 16 + L
    return out


def assert_same_as_reference(path, res: EventFileResult | None = None):
    ref = reference_read(path)
    res = res if res is not None else read_event_file(path)
    df = res.scalars
    assert list(df.columns) == ["step", "tag", "value", "wall_time"]
    assert len(df) == len(ref["points"])
    if ref["points"]:
        steps, tags, vals, walls = zip(*ref["points"])
        assert df["step"].dtype == np.int64 and df["value"].dtype == np.float64 and df["wall_time"].dtype == np.float64
        assert df["step"].tolist() == list(steps)
        assert df["tag"].tolist() == list(tags)
        np.testing.assert_array_equal(bits(df["value"]), bits(vals))
        np.testing.assert_array_equal(bits(df["wall_time"]), bits(walls))
    assert res.texts == ref["texts"]
    assert res.n_records == ref["n_records"]
    assert res.file_version == ref["file_version"]
    got = sorted((p.kind, p.offset) for p in res.problems)
    assert got == sorted(ref["problems"]), [str(p) for p in res.problems]
    for p in res.problems:
        assert p.fatal == (res.n_records == 0)
        assert "could not be decoded" not in p.message  # the internal-error safety net never fires
    return ref


# ------------------------------------------------------------------------------------------------
# CRC32C
# ------------------------------------------------------------------------------------------------
def test_crc32c_known_values():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"a") == tb_crc32c(b"a")
    assert masked_crc32c(b"hello") == tb_masked_crc32c(b"hello")


def test_crc32c_segments_matches_reference_on_all_lengths():
    rng = np.random.default_rng(1)
    lens = list(range(0, 70)) + [127, 128, 129, 255, 256, 511, 512, 513, 1020, 1023, 1024, 1025, 1026, 2047,
                                 2048, 2049, 3000, 4097, 10000, 70001]
    lens += [int(x) for x in rng.integers(0, 1500, 300)]  # many lengths: shared zero-padded buckets
    lens += [44] * 600 + [37] * 700  # big groups: a pass of their own
    blob = rng.integers(0, 256, sum(lens) + 100, dtype=np.uint8).tobytes()
    starts = np.cumsum([0] + lens[:-1]) + 7
    got = crc32c_segments(blob, starts, lens)
    for s, L, c in zip(starts.tolist(), lens, got.tolist()):
        assert c == tb_crc32c(blob[s:s + L]), L


@given(st.lists(st.binary(max_size=2100), min_size=1, max_size=12))
@settings(max_examples=N_EXAMPLES, deadline=None)
def test_crc32c_segments_hypothesis(chunks):
    blob = b"".join(chunks)
    starts = np.cumsum([0] + [len(c) for c in chunks[:-1]])
    got = crc32c_segments(blob, starts, [len(c) for c in chunks])
    assert got.tolist() == [tb_crc32c(c) for c in chunks]


def test_frame_records_is_byte_identical_to_tensorboard_record_writer(tmp_path):
    from tensorboard.summary.writer.record_writer import RecordWriter

    payloads = [b"", b"x", os.urandom(33), os.urandom(1500), scalar_event(3, "train/loss", 1.5).SerializeToString()]

    class Sink:
        def __init__(self):
            self.parts = []

        def write(self, b):
            self.parts.append(b)

    sink = Sink()
    rw = RecordWriter(sink)
    for p in payloads:
        rw.write(p)
    assert frame_records(payloads) == b"".join(sink.parts)


# ------------------------------------------------------------------------------------------------
# reading what tensorboard and torch write
# ------------------------------------------------------------------------------------------------
SPECIAL = [0.0, -0.0, 1.0, -1.5, 7.2734, float("nan"), float("inf"), float("-inf"), 1e-45, 3.4e38, -3.4e38,
           1.17549435e-38, 0.3, 5e-5]


def test_tensorboard_writer_every_point_bit_exact(tmp_path):
    events = []
    expected = []
    steps = [0, 1, 2, 127, 128, 16383, 16384, 2 ** 21, 2 ** 35, 2 ** 42, 2 ** 49, 2 ** 56, 2 ** 63 - 1, -1, -5,
             -(2 ** 63)]
    tags = ["train/loss", "train/grad_norm", "eval/loss", "a", "x" * 100, "y" * 140, "ünïcødé/损失"]
    wall = 1_700_000_000.0
    for i, s in enumerate(steps):
        for j, t in enumerate(tags):
            v = SPECIAL[(i + j) % len(SPECIAL)]
            wall += 0.125
            events.append(scalar_event(s, t, v, wall))
            expected.append((s, t, f32(v), wall))
    path = write_with_tensorboard(tmp_path, events)
    res = read_event_file(path)
    assert res.problems == []
    assert res.file_version == "brain.Event:2"
    assert res.n_records == len(events) + 1
    df = res.scalars
    assert len(df) == len(expected)
    assert df["step"].tolist() == [e[0] for e in expected]
    assert df["tag"].tolist() == [e[1] for e in expected]
    np.testing.assert_array_equal(bits(df["value"]), bits([e[2] for e in expected]))
    np.testing.assert_array_equal(bits(df["wall_time"]), bits([e[3] for e in expected]))
    assert df["value"].isna().sum() == sum(1 for e in expected if math.isnan(e[2]))
    assert np.isinf(df["value"]).sum() == sum(1 for e in expected if math.isinf(e[2]))
    assert_same_as_reference(path, res)


def test_hf_style_run_many_points(tmp_path):
    """The shape HF's TensorBoardCallback writes: 4 tags per step, eval every 50, texts at the start."""
    events = [text_event("args/text_summary", json.dumps({"label_names": ["label_ids"], "eval_steps": 50})),
              text_event("model_config/text_summary", json.dumps({"audio_num_codebooks": 8}))]
    rng = np.random.default_rng(0)
    wall = 1_736_000_000.0
    n_steps = 3000
    for s in range(1, n_steps + 1):
        for t in ("train/loss", "train/grad_norm", "train/learning_rate", "train/epoch"):
            wall += 0.01
            events.append(scalar_event(s, t, float(rng.normal()), wall))
        if s % 50 == 0:
            for t in ("eval/loss", "eval/runtime", "train/epoch"):
                events.append(scalar_event(s, t, float(rng.normal()), wall))
    path = write_with_tensorboard(tmp_path, events)
    res = assert_same_as_reference(path)
    counts = Counter(read_event_file(path).scalars["tag"])
    assert counts["train/loss"] == n_steps and counts["eval/loss"] == n_steps // 50
    assert counts["train/epoch"] == n_steps + n_steps // 50
    r = read_event_file(path)
    assert json.loads(r.texts["args"])["label_names"] == ["label_ids"]
    assert json.loads(r.texts["model_config"])["audio_num_codebooks"] == 8
    assert res["n_records"] == len(events) + 1


def test_many_chunks_and_slabs_keep_every_point(tmp_path, monkeypatch):
    """150,000 points read in 64 KiB chunks (about 125 of them) into slabs of 10,000, 20,000, 40,000, 40,000 ...
    points (chunks cut across slab ends, the last slab part-filled) give exactly the points written, in file
    order, and the same frame as one chunk; the frame holds 25 bytes a point (int64 step, int8 tag codes,
    float64 value and wall_time)."""
    n = 150_000
    rng = np.random.default_rng(11)
    tags = ["train/loss", "train/grad_norm", "train/learning_rate", "eval/loss", "train/epoch"]
    steps = np.repeat(np.arange(1, n // 5 + 1), 5)
    tag_i = np.tile(np.arange(5), n // 5)
    values = rng.normal(size=n).astype(np.float32).astype(np.float64)
    walls = 1_736_000_000.0 + np.arange(n) * 0.013
    payloads = [scalar_event(int(s), tags[t], float(v), float(w)).SerializeToString()
                for s, t, v, w in zip(steps.tolist(), tag_i.tolist(), values.tolist(), walls.tolist())]
    path = tmp_path / "events.out.tfevents.1.many"
    path.write_bytes(frame_records(payloads))
    whole = read_event_file(path)
    monkeypatch.setattr(ev._Columns, "FIRST", 10_000)
    monkeypatch.setattr(ev._Columns, "SLAB", 40_000)
    small = read_event_file(path, chunk=64 * 1024)
    assert small.problems == [] and whole.problems == [] and small.n_records == n
    df = small.scalars
    assert len(df) == n
    assert df["step"].to_numpy().tolist() == steps.tolist()
    assert df["tag"].astype(str).tolist() == [tags[t] for t in tag_i.tolist()]
    assert np.array_equal(df["value"].to_numpy(), values)
    assert np.array_equal(df["wall_time"].to_numpy(), walls)
    pd.testing.assert_frame_equal(df, whole.scalars)
    assert df["tag"].cat.codes.dtype == np.int8
    assert int(df.memory_usage(index=False).sum()) == 25 * n + int(df["tag"].cat.categories.memory_usage())


def test_torch_summary_writer_scalars_text_and_tensor_scalars(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(tmp_path))
    w.add_text("args", '{"metric_for_best_model": "eval_loss"}')
    w.add_text("model_config", '{"use_delay_pattern": true}')
    for s in range(5):
        w.add_scalar("train/loss", 7.0 - s, s)
        w.add_scalar("train/new_style", 0.5 * s, s, new_style=True)
        w.add_scalar("train/double", 1 / 3 + s, s, new_style=True, double_precision=True)
    w.add_histogram("weights", torch.arange(10.0), 3)
    w.add_image("img", torch.zeros(3, 4, 4), 3)
    w.add_scalar("train/nan", float("nan"), 7)
    w.close()
    path = Path(glob.glob(str(tmp_path / "events.out.tfevents.*"))[0])
    res = read_event_file(path)
    assert res.problems == []
    assert res.texts == {"args": '{"metric_for_best_model": "eval_loss"}',
                         "model_config": '{"use_delay_pattern": true}'}
    df = res.scalars
    loss = df[df["tag"] == "train/loss"]
    assert loss["step"].tolist() == [0, 1, 2, 3, 4] and loss["value"].tolist() == [7.0, 6.0, 5.0, 4.0, 3.0]
    new = df[df["tag"] == "train/new_style"]
    assert new["value"].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    dbl = df[df["tag"] == "train/double"]
    assert dbl["value"].tolist() == [1 / 3 + s for s in range(5)]  # double precision kept
    assert df[df["tag"] == "train/nan"]["value"].isna().all()
    assert set(df["tag"]) == {"train/loss", "train/new_style", "train/double", "train/nan"}  # no histogram/image
    assert res.n_records == 1 + 2 + 15 + 2 + 1
    assert_same_as_reference(path, res)


def test_tensor_scalar_dtypes(tmp_path):
    def tensor_event(step, tag, **kw):
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        return event_pb2.Event(wall_time=5.0, step=step, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor_pb2.TensorProto(**kw))]))

    half = int(np.array([1.5], dtype=np.float16).view(np.uint16)[0])
    events = [
        tensor_event(1, "f32", dtype=1, float_val=[2.5]),
        tensor_event(2, "f64", dtype=2, double_val=[0.1]),
        tensor_event(3, "f16", dtype=19, half_val=[half]),
        tensor_event(4, "i64", dtype=9, int64_val=[-7]),
        tensor_event(5, "i32", dtype=3, int_val=[42]),
        tensor_event(6, "content", dtype=2, tensor_content=np.array([2.25]).tobytes(),
                     tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)])),
        tensor_event(7, "vector", dtype=1, float_val=[1.0, 2.0],
                     tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2)])),
        tensor_event(8, "string", dtype=7, string_val=[b"x"]),
    ]
    path = write_raw(tmp_path / "events.out.tfevents.1.h", events)
    df = read_event_file(path).scalars
    assert dict(zip(df["tag"], df["value"])) == {"f32": 2.5, "f64": 0.1, "f16": 1.5, "i64": -7.0, "i32": 42.0,
                                                 "content": 2.25}
    assert df["step"].tolist() == [1, 2, 3, 4, 5, 6]


def test_multi_value_summaries_keep_file_order(tmp_path):
    e = event_pb2.Event(wall_time=3.0, step=9, summary=summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag="a", simple_value=1.0), summary_pb2.Summary.Value(tag="b", simple_value=2.0)]))
    events = [scalar_event(8, "x", 0.5), e, scalar_event(10, "x", 0.25), e]
    path = write_raw(tmp_path / "events.out.tfevents.2.h", events)
    df = read_event_file(path).scalars
    assert list(zip(df["step"], df["tag"], df["value"])) == [
        (8, "x", 0.5), (9, "a", 1.0), (9, "b", 2.0), (10, "x", 0.25), (9, "a", 1.0), (9, "b", 2.0)]


def test_fast_path_equals_protobuf_path(tmp_path, monkeypatch):
    events = [scalar_event(s, t, v) for s, t, v in
              [(0, "train/loss", 1.0), (1, "train/loss", float("nan")), (-3, "t", 2.0), (2 ** 40, "u" * 30, -0.0),
               (5, "train/grad_norm", float("inf")), (300, "z" * 127, 1e-40)]]
    path = write_with_tensorboard(tmp_path, events * 50)
    fast = read_event_file(path)
    empty = (np.zeros(0, np.int64),) * 3 + (np.zeros(0),) * 2 + (np.zeros(0, np.int64),) * 2
    monkeypatch.setattr(ev, "fast_scalars", lambda *a, **k: empty)
    slow = read_event_file(path)
    pd.testing.assert_frame_equal(fast.scalars, slow.scalars, check_categorical=False)
    np.testing.assert_array_equal(bits(fast.scalars["value"]), bits(slow.scalars["value"]))
    assert fast.n_records == slow.n_records and fast.problems == slow.problems == []


# ------------------------------------------------------------------------------------------------
# damaged and foreign files
# ------------------------------------------------------------------------------------------------
def _small_file(tmp_path, n=40):
    events = [scalar_event(s, "train/loss", 7.0 - 0.01 * s, 1000.0 + s) for s in range(1, n + 1)]
    return write_with_tensorboard(tmp_path, events)


def _record_offsets(data: bytes):
    pos, out = 0, []
    while pos + 12 <= len(data):
        (L,) = struct.unpack_from("<Q", data, pos)
        out.append((pos, L))
        pos += 16 + L
    return out


def test_truncated_last_record_keeps_everything_before(tmp_path):
    src = _small_file(tmp_path / "src")
    data = src.read_bytes()
    recs = _record_offsets(data)
    last_off, last_len = recs[-1]
    for cut in (last_off + 5, last_off + 12, last_off + 12 + last_len - 1, last_off + 12 + last_len + 2):
        p = tmp_path / f"events.out.tfevents.cut{cut}"
        p.write_bytes(data[:cut])
        res = read_event_file(p)
        assert len(res.scalars) == 39  # all points before the cut record
        assert res.scalars["step"].tolist() == list(range(1, 40))
        assert len(res.problems) == 1
        prob = res.problems[0]
        assert prob.kind == "truncated" and prob.offset == last_off and not prob.fatal
        assert "record" in prob.message
        assert_same_as_reference(p, res)


def test_flipped_data_byte_is_a_crc_problem_and_the_rest_is_read(tmp_path):
    src = _small_file(tmp_path / "src")
    data = bytearray(src.read_bytes())
    recs = _record_offsets(bytes(data))
    off, L = recs[10]  # the 10th scalar event (record 0 is file_version)
    data[off + 12 + L // 2] ^= 0x40
    p = tmp_path / "events.out.tfevents.flip"
    p.write_bytes(bytes(data))
    res = read_event_file(p)
    assert [(q.kind, q.offset, q.fatal) for q in res.problems] == [("crc", off, False)]
    assert len(res.scalars) == 39 and 10 not in res.scalars["step"].tolist()
    assert_same_as_reference(p, res)


def test_flipped_length_byte_stops_the_framing(tmp_path):
    src = _small_file(tmp_path / "src")
    data = bytearray(src.read_bytes())
    recs = _record_offsets(bytes(data))
    off, _ = recs[20]
    data[off] ^= 0x01
    p = tmp_path / "events.out.tfevents.len"
    p.write_bytes(bytes(data))
    res = read_event_file(p)
    assert [(q.kind, q.offset) for q in res.problems] == [("crc", off)]
    assert "framing" in res.problems[0].message
    assert res.scalars["step"].tolist() == list(range(1, 20))
    assert_same_as_reference(p, res)


def test_flipped_stored_crc(tmp_path):
    src = _small_file(tmp_path / "src")
    data = bytearray(src.read_bytes())
    recs = _record_offsets(bytes(data))
    off, L = recs[-1]
    data[off + 12 + L] ^= 0xFF
    p = tmp_path / "events.out.tfevents.crc"
    p.write_bytes(bytes(data))
    res = read_event_file(p)
    assert [(q.kind, q.offset) for q in res.problems] == [("crc", off)]
    assert len(res.scalars) == 39


def test_many_bad_records_are_summarised(tmp_path):
    src = _small_file(tmp_path / "src", n=60)
    data = bytearray(src.read_bytes())
    for off, L in _record_offsets(bytes(data))[1:31]:
        data[off + 12 + L - 1] ^= 0x10  # corrupt the float of 30 records
    p = tmp_path / "events.out.tfevents.many"
    p.write_bytes(bytes(data))
    res = read_event_file(p)
    assert len(res.scalars) == 30
    assert len(res.problems) == ev._MAX_CRC_PROBLEMS + 1
    assert "20 more records" in res.problems[-1].message


def test_lfs_pointer(tmp_path):
    p = tmp_path / "events.out.tfevents.1671085786.ficino.1546868.0"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 21573\n")
    res = read_event_file(p)
    assert res.scalars.empty and res.texts == {} and res.n_records == 0
    assert len(res.problems) == 1
    prob = res.problems[0]
    assert prob.fatal and prob.kind == "lfs-pointer"
    assert "Git LFS pointer" in prob.message and "not an event file" in prob.message and "21,573" in prob.message


def test_empty_file(tmp_path):
    p = tmp_path / "events.out.tfevents.0.empty"
    p.write_bytes(b"")
    res = read_event_file(p)
    assert res.scalars.empty and list(res.scalars.columns) == ["step", "tag", "value", "wall_time"]
    assert res.n_records == 0
    assert [q.kind for q in res.problems] == ["empty"]


@pytest.mark.parametrize("content", [
    b'{"log_history": []}\n' * 3,
    b"\x00" * 5,
    b"hello world, not an event file at all",
    os.urandom(3000),
    b"\xff" * 64,
])
def test_foreign_files_never_raise(tmp_path, content):
    p = tmp_path / "events.out.tfevents.9.x"
    p.write_bytes(content)
    res = read_event_file(p)
    assert res.scalars.empty
    assert len(res.problems) >= 1 and all(q.fatal for q in res.problems)


def test_unreadable_path(tmp_path):
    res = read_event_file(tmp_path / "does-not-exist")
    assert res.problems and res.problems[0].fatal and res.problems[0].kind == "unreadable"
    res = read_event_file(tmp_path)  # a directory
    assert res.problems and res.problems[0].fatal


def test_event_without_wall_time_mid_file(tmp_path):
    """An Event without wall_time does not start with 0x09: the vectorised walk hands over to the
    sequential one and back."""
    events = [scalar_event(s, "a", 1.0 * s, 10.0 + s) for s in range(1, 30)]
    events[10] = scalar_event(11, "a", 11.0, 0.0)  # wall_time 0 is not serialised
    events[20] = event_pb2.Event(step=5)  # nothing but a step
    path = write_with_tensorboard(tmp_path, events)
    res = assert_same_as_reference(path)
    assert len(res["points"]) == 28


def test_is_event_file():
    assert is_event_file("events.out.tfevents.1742826235.DESKTOP-41L2EO3.107869.0")
    assert is_event_file("/a/runs/x/events.out.tfevents.1.h.2.0")
    assert not is_event_file("trainer_state.json")
    assert not is_event_file("events.out.tfevents.d/trainer_state.json")


def test_module_does_not_import_torch_or_tensorflow():
    """Neither the reader nor anything else under higgs_diag/run/ (nor the layout module) imports torch."""
    modules = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "higgs_diag" / "run").glob("*.py"))
    assert {"events", "crc32c", "tfrecord", "event_proto", "bytebuf"} <= set(modules)
    code = ("import sys, importlib; import higgs_diag.layout; "
            f"[importlib.import_module('higgs_diag.run.' + m) for m in {modules!r}]; "
            "assert not any(m == 'torch' or m.startswith(('torch.', 'tensorflow', 'transformers')) for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith(('torch', 'tensorflow', 'transformers')))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).resolve().parents[1]))


# ------------------------------------------------------------------------------------------------
# hypothesis: random events, random damage; identical to the reference reader
# ------------------------------------------------------------------------------------------------
finite_or_not = st.floats(width=32, allow_nan=True, allow_infinity=True)
tags_st = st.one_of(st.sampled_from(["train/loss", "train/grad_norm", "eval/loss", "train/epoch"]),
                    st.text(min_size=0, max_size=150))
steps_st = st.one_of(st.integers(-10, 20000), st.integers(-(2 ** 63), 2 ** 63 - 1))
walls_st = st.one_of(st.just(0.0), st.floats(0, 2e9, allow_nan=False))


@st.composite
def events_st(draw):
    kind = draw(st.sampled_from(["scalar"] * 6 + ["multi", "text", "tensor", "empty"]))
    step = draw(steps_st)
    wall = draw(walls_st)
    if kind == "scalar":
        return scalar_event(step, draw(tags_st), draw(finite_or_not), wall)
    if kind == "multi":
        vals = [summary_pb2.Summary.Value(tag=draw(tags_st), simple_value=draw(finite_or_not))
                for _ in range(draw(st.integers(0, 3)))]
        return event_pb2.Event(wall_time=wall, step=step, summary=summary_pb2.Summary(value=vals))
    if kind == "text":
        return text_event(draw(st.sampled_from(["args/text_summary", "model_config/text_summary", "notes"])),
                          draw(st.text(max_size=300)), wall, plugin=draw(st.booleans()))
    if kind == "tensor":
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        return event_pb2.Event(wall_time=wall, step=step, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=draw(tags_st), metadata=meta,
                                      tensor=tensor_pb2.TensorProto(dtype=1, float_val=[draw(finite_or_not)]))]))
    return event_pb2.Event(wall_time=wall, step=step)


@given(st.lists(events_st(), max_size=40))
@HYP
def test_hypothesis_random_events_match_reference(tmp_path_factory, events):
    d = tmp_path_factory.mktemp("h")
    path = write_with_tensorboard(d, events)
    res = assert_same_as_reference(path)
    assert res["problems"] == []


@given(st.lists(events_st(), min_size=1, max_size=25), st.data())
@HYP
def test_hypothesis_damaged_files_match_reference(tmp_path_factory, events, data):
    d = tmp_path_factory.mktemp("d")
    path = write_with_tensorboard(d, events)
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "flip", "flip2", "zero_run", "append"]))
    if how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    elif how in ("flip", "flip2"):
        for _ in range(1 if how == "flip" else 2):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "zero_run":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i:i + 8] = bytes(len(raw[i:i + 8]))
    else:
        raw += data.draw(st.binary(min_size=1, max_size=40))
    path.write_bytes(bytes(raw))
    assert_same_as_reference(path)


@given(st.binary(max_size=3000))
@settings(max_examples=2 * N_EXAMPLES, deadline=None)
def test_hypothesis_walk_equals_sequential_walk(blob):
    """The vectorised walk finds exactly the sequential walk's record starts, on any bytes."""
    _check_walk(blob)


@given(st.lists(st.tuples(st.integers(0, 200), st.binary(max_size=8)), max_size=60), st.data())
@settings(max_examples=2 * N_EXAMPLES, deadline=None)
def test_hypothesis_walk_with_decoy_candidates(records, data):
    """Record-like bytes with 0x09 at byte 12 everywhere: false candidates that point into the chain."""
    parts = []
    for L, junk in records:
        body = bytearray(os.urandom(L))
        for k in range(0, L, max(1, data.draw(st.integers(1, 9)))):
            body[k] = 0x09
        if L >= 12 and junk:
            # a fake header inside the payload pointing at a plausible place
            fake = struct.pack("<Q", data.draw(st.integers(0, 300)))
            at = data.draw(st.integers(0, L - 12))
            body[at:at + 8] = fake
        parts.append(bytes(body))
    blob = frame_records(parts)
    if data.draw(st.booleans()) and blob:
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    _check_walk(blob)


def _check_walk(blob: bytes):
    F = bytebuf.FRONT
    buf = np.zeros(F + len(blob) + bytebuf.BACK, dtype=np.uint8)
    buf[F:F + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    starts, lens = tfrecord.walk(buf, F, len(blob))
    s_ref, l_ref = [], []
    tfrecord.walk_seq(buf, F, len(blob), 0, s_ref, l_ref)
    assert starts.tolist() == s_ref
    assert lens.tolist() == l_ref


# ------------------------------------------------------------------------------------------------
# the corpus of real event files
# ------------------------------------------------------------------------------------------------
def _corpus_rows():
    index = CORPUS / "INDEX.tsv"
    if not index.exists():
        return []
    csv.field_size_limit(10 ** 9)
    with open(index, newline="") as f:
        return [r for r in csv.DictReader(f, delimiter="\t") if r["kind"] == "tfevents"]


@pytest.mark.skipif(not _corpus_rows(), reason="corpus not available")
@pytest.mark.parametrize("row", _corpus_rows(), ids=lambda r: r["local_file"][-60:])
def test_corpus_file(row):
    path = CORPUS / row["local_file"]
    res = read_event_file(path)
    counts = json.loads(row["scalar_counts"] or "{}")
    scalars = {k: v for k, v in counts.items() if not k.endswith(" (tensor)")}
    texts = sorted(k[: -len(" (tensor)")].removesuffix("/text_summary") for k in counts if k.endswith(" (tensor)"))
    assert dict(Counter(res.scalars["tag"])) == scalars
    assert sorted(res.texts) == texts
    for t in res.texts.values():
        json.loads(t)  # HF writes JSON
    assert res.n_records == int(row["n_records"] or 0)
    notes = row["notes"]
    if "Git LFS pointer" in notes:
        assert [(p.kind, p.fatal) for p in res.problems] == [("lfs-pointer", True)]
    elif "truncated" in notes:
        assert [(p.kind, p.offset, p.fatal) for p in res.problems] == [("truncated", 88, False)]
        assert "4,128" in res.problems[0].message and "4,084" in res.problems[0].message
        assert res.file_version == "brain.Event:2"
    else:
        assert res.problems == []
        assert res.file_version == "brain.Event:2"
    if not res.scalars.empty:
        assert_same_as_reference(path, res)


def test_corpus_truncated_file_copy(tmp_path):
    """The truncated corpus file, cut further and extended: still never raises."""
    rows = [r for r in _corpus_rows() if "truncated" in r["notes"]]
    if not rows:
        pytest.skip("corpus not available")
    src = CORPUS / rows[0]["local_file"]
    p = tmp_path / src.name
    shutil.copy(src, p)
    data = p.read_bytes()
    for cut in (0, 11, 12, 50, 87, 88, 99, 100, len(data)):
        p.write_bytes(data[:cut])
        assert_same_as_reference(p)
