"""The event reader's vectorised fast path (word-wise byte checks, tag codes, step varint, value and wall time
taken from the gathered uint32 words) against protobuf's decoding of the same records: every tag length 1..127
(each padding of a payload to 4 bytes), every step varint width, wall times of every alignment, more than 8
distinct tags of one length in one layout group (the sorted fallback), and damaged records among them."""
from __future__ import annotations

import numpy as np
import pandas as pd
from tensorboard.compat.proto import event_pb2, summary_pb2

from higgs_diag.run import events as ev
from higgs_diag.run.events import frame_records, read_event_file

EMPTY = (np.zeros(0, np.int64),) * 3 + (np.zeros(0),) * 2 + (np.zeros(0, np.int64),) * 2


def _event(step: int, tag: str, value: float, wall: float) -> bytes:
    return event_pb2.Event(wall_time=wall, step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])).SerializeToString()


def _bits(s: pd.Series) -> np.ndarray:
    return s.to_numpy(dtype=np.float64).view(np.uint64)


def _fast_and_slow(tmp_path, monkeypatch, payloads: list[bytes]):
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(frame_records(payloads))
    return _read_both(path, monkeypatch)


def _read_both(path, monkeypatch):
    """The file read as it is, and with the fast scalar path off (every record through protobuf)."""
    fast = read_event_file(path)
    with monkeypatch.context() as m:
        m.setattr(ev, "fast_scalars", lambda *a, **k: EMPTY)
        slow = read_event_file(path)
    return fast, slow


def _same(fast, slow) -> None:
    assert len(fast.scalars) == len(slow.scalars)
    for col in ("step", "tag"):
        assert fast.scalars[col].astype(object).tolist() == slow.scalars[col].astype(object).tolist(), col
    for col in ("value", "wall_time"):
        np.testing.assert_array_equal(_bits(fast.scalars[col]), _bits(slow.scalars[col]))
    assert fast.n_records == slow.n_records
    assert [(p.kind, p.offset) for p in fast.problems] == [(p.kind, p.offset) for p in slow.problems]


def test_every_tag_length_step_width_and_wall_alignment(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    steps = [0, 1, 127, 128, 16_383, 16_384, 2 ** 21, 2 ** 28, 2 ** 35, 2 ** 42, 2 ** 49, 2 ** 56, 2 ** 63 - 1, -1, -5]
    payloads = []
    for T in range(1, 128):
        for i, step in enumerate(steps):
            tag = chr(ord("a") + i % 26) * T
            wall = float(rng.uniform(0, 2e9)) if i % 3 else float(rng.integers(0, 2 ** 31))
            payloads.append(_event(step, tag, float(np.float32(rng.standard_normal())), wall))
    fast, slow = _fast_and_slow(tmp_path, monkeypatch, payloads)
    assert len(fast.scalars) == len(payloads)
    _same(fast, slow)


def test_many_distinct_tags_in_one_layout_and_non_utf8_tags(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    tags = [f"train/metric_{k:02d}" for k in range(40)]  # 40 tags of one length: one layout group per step width
    payloads = []
    for s in range(1, 3000):
        payloads.append(_event(s, tags[int(rng.integers(0, len(tags)))], float(rng.standard_normal()),
                               1.7e9 + s * 0.37))
    bad_tag = bytearray(_event(5, "train/metric_xx", 1.0, 1.7e9))
    bad_tag[bad_tag.index(b"xx")] = 0xFF  # not UTF-8: protobuf's path refuses it, the fast path leaves it
    payloads.insert(100, bytes(bad_tag))
    fast, slow = _fast_and_slow(tmp_path, monkeypatch, payloads)
    _same(fast, slow)
    assert set(fast.scalars["tag"].astype(str)) == set(tags)


def test_damaged_records_among_fast_ones(tmp_path, monkeypatch):
    payloads = [_event(s, "train/loss", 1.0 / s, 1.7e9 + s) for s in range(1, 2000)]
    blob = bytearray(frame_records(payloads))
    pos, k = 0, 0
    while pos + 12 <= len(blob):  # flip a data byte of every 97th record (its data CRC no longer matches)
        L = int.from_bytes(blob[pos:pos + 8], "little")
        if k % 97 == 5:
            blob[pos + 12 + L // 2] ^= 0x10
        pos += 16 + L
        k += 1
    path = tmp_path / "events.out.tfevents.2.host"
    path.write_bytes(bytes(blob))
    fast, slow = _read_both(path, monkeypatch)
    _same(fast, slow)
    assert sum(p.kind == "crc" for p in fast.problems) >= 10


def _protobuf_decode(data: bytes):
    """decode_event through protobuf only (texts, points, file_version), or None when protobuf refuses it."""
    from higgs_diag.run import event_proto

    texts: dict = {}
    points: list = []
    try:
        with _no_simple(event_proto):
            fv = event_proto.decode_event(data, 0, points, event_proto.Tags(), texts)
    except Exception:  # noqa: BLE001 - DecodeError and friends
        return None
    return fv, texts, points


class _no_simple:
    def __init__(self, mod):
        self.mod, self.saved = mod, mod._simple_event

    def __enter__(self):
        def refuse(data, texts):
            raise self.mod._NotSimple

        self.mod._simple_event = refuse

    def __exit__(self, *exc):
        self.mod._simple_event = self.saved


def test_text_and_file_version_records_without_protobuf_match_protobuf():
    """The records read without protobuf (file_version, text summaries in torch's form) give what protobuf gives;
    every one-byte change of them is either read the same way as protobuf reads it or left to protobuf."""
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2

    from higgs_diag.run import event_proto

    def text(tag, body, plugin="text", step=0, n_vals=1):
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin))
        v = summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor_pb2.TensorProto(
            dtype=7, string_val=[body.encode()] * n_vals,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)])))
        return event_pb2.Event(wall_time=1.7e9, step=step, summary=summary_pb2.Summary(value=[v])).SerializeToString()

    from tensorboard.compat.proto import event_pb2 as epb

    records = [event_pb2.Event(wall_time=1.7e9, file_version="brain.Event:2").SerializeToString(),
               event_pb2.Event(wall_time=1.7e9, file_version="brain.Event:2", source_metadata=epb.SourceMetadata(
                   writer="tensorboard.summary.writer.event_file_writer")).SerializeToString(),
               text("args/text_summary", '{"a": 1, "b": "é"}'), text("model_config/text_summary", "{}", step=-3),
               text("notes", "x", plugin=""), text("x/text_summary", "y", plugin=""), text("t", "", n_vals=0),
               text("t2", "a\nb", n_vals=3), text("s", "v", plugin="scalars")]
    rng = np.random.default_rng(3)
    simple = 0
    for rec in records:
        variants = [rec] + [_set(rec, i, b) for i, b in zip(rng.integers(0, len(rec), 300).tolist(),
                                                             rng.integers(0, 256, 300).tolist())]
        for data in variants:
            texts: dict = {}
            try:
                fv = event_proto._simple_event(data, texts)
            except event_proto._NotSimple:
                assert texts == {}
                continue
            simple += 1
            ref = _protobuf_decode(data)
            assert ref is not None, data
            assert (fv, texts) == ref[:2] and ref[2] == [], data
    assert simple > len(records)


def _set(rec: bytes, i: int, b: int) -> bytes:
    a = bytearray(rec)
    a[i] = b
    return bytes(a)
