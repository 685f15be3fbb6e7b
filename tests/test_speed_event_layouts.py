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
