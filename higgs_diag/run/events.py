"""Our own reader of TensorBoard event files: TFRecord framing, both CRC32C checks, every scalar point.

No TensorFlow, no torch: numpy, pandas and the protobuf classes that ship with the ``tensorboard``
package (``tensorboard.compat.proto``, imported lazily and only for records off the fast path).

A file is a sequence of TFRecord records whose data is a serialised ``tensorboard.Event``. Speed (a 47 MB
file of 862k scalar events reads in a few tenths of a second) comes from doing everything on arrays
instead of per record; the work is split by concern:

* :mod:`.bytebuf`: the zero-padded buffer the file is read into, and gathers from it;
* :mod:`.crc32c`: CRC-32C of many records at once (and TFRecord's masking);
* :mod:`.tfrecord`: the chain of record starts, found without a Python loop over records, and the
  header CRC checks (the framing is trusted up to the first bad header);
* :mod:`.event_proto`: the vectorised decoding of HF/torch scalar events (each layout group gathered once
  for its data CRC and its fields), protobuf's ``Event.FromString`` for everything else;
* this module: the reader, which puts them together and reports every damage with its byte offset.

``crc32c``, ``masked_crc32c``, ``crc32c_segments`` and ``frame_records`` are re-exported from here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..layout import is_event_file
from .bytebuf import BACK, FRONT, u32_at
from .crc32c import crc32c, crc32c_segments, crc_segments, mask, masked_crc32c
from .event_proto import Tags, decode_event, fast_scalars
from .model import ReadProblem
from .tfrecord import check_frames, frame_records

__all__ = [
    "EventFileResult",
    "read_event_file",
    "is_event_file",
    "crc32c",
    "masked_crc32c",
    "crc32c_segments",
    "frame_records",
]

LFS_PREFIX = b"version https://git-lfs.github.com/spec/"
_MAX_CRC_PROBLEMS = 10  # bad records (CRC, protobuf) reported one by one before a summary problem


@dataclass
class EventFileResult:
    path: str
    scalars: pd.DataFrame  # step (int64), tag (categorical), value (float64, NaN/Inf kept), wall_time (float64); file order
    texts: dict[str, str] = field(default_factory=dict)  # tag without "/text_summary" -> text (last wins)
    problems: list[ReadProblem] = field(default_factory=list)
    n_records: int = 0  # records with a valid frame and both CRCs
    file_version: str | None = None


def _empty_scalars() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": pd.Series([], dtype="int64"),
            "tag": pd.Series([], dtype="object"),
            "value": pd.Series([], dtype="float64"),
            "wall_time": pd.Series([], dtype="float64"),
        }
    )


def read_event_file(path) -> EventFileResult:
    """Read every scalar point and text summary of one TensorBoard event file. Never raises on bad
    bytes: a truncated last record, a CRC mismatch, a Git LFS pointer or a file that is not an event
    file becomes a ReadProblem naming the byte offset, and everything readable is used."""
    name = str(path)
    res = EventFileResult(path=name, scalars=_empty_scalars())
    try:
        size = os.path.getsize(path)
        buf = np.zeros(FRONT + size + BACK, dtype=np.uint8)
        with open(path, "rb") as f:
            n = f.readinto(memoryview(buf)[FRONT:FRONT + size])
    except OSError as e:
        res.problems.append(ReadProblem(name, f"cannot read: {e.strerror or e}", kind="unreadable", fatal=True))
        return res
    try:
        cols = _read(buf, FRONT, n, res)
        del buf  # before the DataFrame is built: peak memory
        if cols is not None:
            step, tid, val, wall, names = cols
            tag = pd.Categorical.from_codes(np.asarray(tid, dtype=np.int32), categories=pd.Index(names, dtype=object))
            res.scalars = pd.DataFrame({"step": step, "tag": tag, "value": val, "wall_time": wall})
    except Exception as e:  # a reader bug must not take the whole analysis down
        res.problems.append(ReadProblem(
            name, f"could not be decoded ({type(e).__name__}: {e})", kind="unreadable", fatal=res.n_records == 0))
    return res


def _read(buf: np.ndarray, F: int, n: int, res: EventFileResult):
    """Fill res (problems, texts, n_records, file_version); return the scalar columns
    (step, tag_id, value, wall_time, tag names) or None."""
    name = res.path
    problems = res.problems
    refusal = _refusal(buf, F, n, name)
    if refusal is not None:
        problems.append(refusal)
        return None
    # 1. framing and header CRCs: the framing is trusted up to the first bad one
    frames = check_frames(buf, F, n, name)
    if frames.fatal is not None:
        problems.append(frames.fatal)
        return None
    starts, lens = frames.starts, frames.lens
    R = len(starts)
    # 2. data CRCs (a bad record is skipped, the framing goes on) and the fast decoding path
    ds = starts + (F + 12)
    stored = u32_at(buf, ds + lens)
    tags = Tags()
    f_rec, f_step, f_tag, f_val, f_wall, checked, f_bad = fast_scalars(buf, ds, lens, np.arange(R), stored, tags)
    good = _data_crcs_ok(buf, ds, lens, stored, checked, f_bad)
    _report_bad_data(good, starts, lens, name, problems)
    # 3. everything off the fast path: protobuf
    todo = np.ones(R, dtype=bool)
    todo[f_rec] = False
    todo[~good] = False
    points: list[tuple] = []
    texts: dict[str, str] = {}
    _decode_rest(buf, ds, lens, starts, np.flatnonzero(todo), good, res, points, tags, texts)
    if frames.stop is not None:
        problems.append(frames.stop)
    res.n_records = int(good.sum())
    res.texts = texts
    if res.n_records == 0:
        for p in problems:
            p.fatal = True
    # 4. the points in file order
    return _assemble(R, (f_rec, f_step, f_tag, f_val, f_wall), points, tags)


def _refusal(buf: np.ndarray, F: int, n: int, name: str) -> ReadProblem | None:
    """Why the n file bytes at buf[F:] cannot be an event file at all (empty, a Git LFS pointer, shorter
    than a record header), or None."""
    if n == 0:
        return ReadProblem(name, "empty event file: the writer was created but never flushed a record",
                           offset=0, kind="empty", fatal=True)
    head = buf[F:F + min(n, 200)].tobytes()
    if head.startswith(LFS_PREFIX):
        m = re.search(rb"^size (\d+)", buf[F:F + min(n, 1024)].tobytes(), re.M)
        what = f" of a {int(m.group(1)):,}-byte file" if m else ""
        return ReadProblem(
            name, f"a Git LFS pointer{what}, not an event file: run `git lfs pull` to fetch the real file",
            offset=0, kind="lfs-pointer", fatal=True)
    if n < 12:
        return ReadProblem(
            name, f"truncated: {n} bytes, less than one record header (12 bytes)", offset=0, kind="truncated",
            fatal=True)
    return None


def _data_crcs_ok(buf: np.ndarray, ds: np.ndarray, lens: np.ndarray, stored: np.ndarray, checked: np.ndarray,
                  f_bad: np.ndarray) -> np.ndarray:
    """Per record: whether its data CRC matches. The fast path checked ``checked`` (``f_bad`` among them
    do not match); the rest are checked here."""
    R = len(ds)
    good = np.ones(R, dtype=bool)
    good[f_bad] = False
    rest = np.ones(R, dtype=bool)
    rest[checked] = False
    rest = np.flatnonzero(rest)
    if rest.size:
        good[rest[mask(crc_segments(buf, ds[rest], lens[rest])) != stored[rest]]] = False
    return good


def _report_bad_data(good: np.ndarray, starts: np.ndarray, lens: np.ndarray, name: str, problems: list) -> None:
    """A problem per record with a bad data CRC (the first few), then one for the rest."""
    nbad = int(len(good) - good.sum())
    if not nbad:
        return
    bad = np.flatnonzero(~good)
    for b in bad[:_MAX_CRC_PROBLEMS].tolist():
        problems.append(ReadProblem(
            name, f"record data CRC mismatch ({int(lens[b]):,} bytes); the record was skipped",
            offset=int(starts[b]), kind="crc"))
    if nbad > _MAX_CRC_PROBLEMS:
        problems.append(ReadProblem(
            name, f"{nbad - _MAX_CRC_PROBLEMS:,} more records with a data CRC mismatch were skipped "
                  f"(the last at byte {int(starts[bad[-1]]):,})", offset=int(starts[bad[_MAX_CRC_PROBLEMS]]),
            kind="crc"))


def _decode_rest(buf: np.ndarray, ds: np.ndarray, lens: np.ndarray, starts: np.ndarray, recs: np.ndarray,
                 good: np.ndarray, res: EventFileResult, points: list, tags: Tags, texts: dict) -> None:
    """Decode the records ``recs`` with protobuf: their scalars into points, their text summaries into texts,
    the first file_version into res; a record that does not parse is marked not good and reported."""
    name = res.path
    n_unparsed = 0
    for r in recs.tolist():
        d0 = int(ds[r])
        try:
            fv = decode_event(buf[d0:d0 + int(lens[r])].tobytes(), r, points, tags, texts)
        except Exception as e:  # google.protobuf.message.DecodeError and friends
            n_unparsed += 1
            good[r] = False
            if n_unparsed <= _MAX_CRC_PROBLEMS:
                res.problems.append(ReadProblem(
                    name, f"record does not parse as a TensorBoard Event ({e}); skipped", offset=int(starts[r]),
                    kind="unreadable"))
            continue
        if fv and res.file_version is None:
            res.file_version = fv
    if n_unparsed > _MAX_CRC_PROBLEMS:
        res.problems.append(ReadProblem(
            name, f"{n_unparsed - _MAX_CRC_PROBLEMS:,} more records do not parse as Events; skipped",
            kind="unreadable"))


def _assemble(R: int, fast: tuple, points: list, tags: Tags):
    """(step, tag_id, value, wall_time, tag names) in file order, from the fast path's columns
    (record, step, tag_id, value, wall_time; one point per record) and the protobuf path's points
    (record, step, tag_id, value, wall_time) tuples, in record order; None when there are no points."""
    f_rec = fast[0]
    cnt = np.zeros(R, dtype=np.int64)
    cnt[f_rec] = 1
    if points:
        p_rec = np.fromiter((p[0] for p in points), dtype=np.int64, count=len(points))
        np.add.at(cnt, p_rec, 1)
    total = int(cnt.sum())
    if not total:
        return None
    pos = np.cumsum(cnt) - cnt
    step = np.empty(total, dtype=np.int64)
    tid = np.empty(total, dtype=np.int64)
    val = np.empty(total, dtype=np.float64)
    wall = np.empty(total, dtype=np.float64)
    at = pos[f_rec]
    step[at], tid[at], val[at], wall[at] = fast[1:]
    del at
    if points:
        first = np.r_[True, p_rec[1:] != p_rec[:-1]]
        grp = np.cumsum(first) - 1
        start_of_grp = np.flatnonzero(first)
        at = pos[p_rec] + (np.arange(len(points)) - start_of_grp[grp])
        step[at] = [p[1] for p in points]
        tid[at] = [p[2] for p in points]
        val[at] = [p[3] for p in points]
        wall[at] = [p[4] for p in points]
    names = np.empty(len(tags.names), dtype=object)
    names[:] = tags.names
    return step, tid, val, wall, names
