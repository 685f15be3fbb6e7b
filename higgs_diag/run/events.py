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

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import limits
from ..layout import is_event_file
from .bytebuf import BACK, FRONT, u32_at
from .crc32c import crc32c, crc32c_segments, crc_segments, mask, masked_crc32c
from .event_proto import Tags, decode_event, fast_scalars
from .model import ReadProblem
from .tfrecord import check_frames, frame_records, used
from .trainer_state import JSONLimitError, is_out_of_range, loads_bounded

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
CONFIG_TEXTS = ("args", "model_config")  # the text summaries the run is configured from (JSON)
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


def read_event_file(path, chunk: int | None = None) -> EventFileResult:
    """Read every scalar point and text summary of one TensorBoard event file. Never raises on bad
    bytes: a truncated last record, a CRC mismatch, a Git LFS pointer or a file that is not an event
    file becomes a ReadProblem naming the byte offset, and everything readable is used. Only a regular file
    is read (a FIFO or device is refused without blocking), in chunks of ``limits.EVENT_READ_CHUNK_BYTES``:
    memory grows with the points kept, not with the file."""
    name = str(path)
    res = EventFileResult(path=name, scalars=_empty_scalars())
    refusal = getattr(path, "refusal", None)  # a path discover would not read (see discover.Refused)
    if refusal is not None:
        res.problems.append(refusal)
        return res
    try:
        fh, _size = limits.open_regular(path, what="TensorBoard event file")
    except limits.NotReadable as e:
        res.problems.append(ReadProblem(name, str(e), kind="unreadable", fatal=True))
        return res
    reader = _ChunkReader(res, chunk or limits.EVENT_READ_CHUNK_BYTES)
    try:
        with fh:
            reader.run(fh)
    except OSError as e:
        res.problems.append(ReadProblem(name, f"read error after byte {reader.base:,}: {e.strerror or e}; what "
                                              f"came before was used", offset=reader.base, kind="truncated"))
    except Exception as e:  # noqa: BLE001 - a reader bug must not take the whole analysis down
        res.problems.append(ReadProblem(name, f"could not be decoded ({type(e).__name__}: {e})", kind="unreadable"))
    try:
        res.n_records = reader.n_good
        res.texts = _bounded_texts(reader.texts, res)
        if res.n_records == 0:
            for p in res.problems:
                p.fatal = True
        cols = reader.columns()
        if cols is not None:
            step, tid, val, wall, names = cols
            del cols
            tag = pd.Categorical.from_codes(tid, categories=pd.Index(names, dtype=object))  # int8 codes for < 128 tags
            del tid
            # copy=False: the frame holds these arrays (one block each), not a consolidated copy of them
            res.scalars = pd.DataFrame({"step": step, "tag": tag, "value": val, "wall_time": wall}, copy=False)
    except Exception as e:  # noqa: BLE001 - as above
        res.problems.append(ReadProblem(name, f"could not be decoded ({type(e).__name__}: {e})", kind="unreadable",
                                        fatal=True))
    return res


def _readinto(fh, view: memoryview) -> int:
    """Fill ``view`` from ``fh`` as far as the file goes; the number of bytes read."""
    got = 0
    while got < len(view):
        k = fh.readinto(view[got:])
        if not k:
            break
        got += k
    return got


class _ChunkReader:
    """Reads a file chunk by chunk: each chunk's complete records are decoded, the bytes of a record that
    continues in the next chunk are carried over (a record longer than a chunk is read whole, up to
    ``limits.MAX_EVENT_RECORD_BYTES``)."""

    def __init__(self, res: EventFileResult, chunk: int):
        self.res, self.chunk = res, chunk
        self.tags = Tags()
        self.texts: dict[str, str] = {}
        self.cols = _Columns()  # step, tag id, value, wall_time of every point so far
        self.base = 0  # file offset of the carried bytes (the start of the next chunk's buffer)
        self.n_records = 0  # records framed so far (for the problems' counts)
        self.n_good = 0

    def run(self, fh) -> None:
        name = self.res.path
        carry, need = b"", 0
        while True:
            want = max(self.chunk, need)
            buf = np.zeros(FRONT + len(carry) + want + BACK, dtype=np.uint8)
            buf[FRONT:FRONT + len(carry)] = np.frombuffer(carry, dtype=np.uint8)
            got = _readinto(fh, memoryview(buf)[FRONT + len(carry):FRONT + len(carry) + want])
            n, eof = len(carry) + got, got < want
            if self.base == 0 and (eof or n >= len(LFS_PREFIX)):  # empty, too short or a Git LFS pointer
                refusal = _refusal(buf, FRONT, n, name) if eof else _refusal(buf, FRONT, max(n, 12), name)
                if refusal is not None:
                    self.res.problems.append(refusal)
                    return
            if n == 0:
                return
            frames = check_frames(buf, FRONT, n, name, base=self.base, eof=eof, before=self.n_records)
            if frames.fatal is not None:
                self.res.problems.append(frames.fatal)
                return
            self._decode(buf, frames)
            if frames.stop is not None:
                self.res.problems.append(frames.stop)
                return
            if eof:
                return
            rest = frames.rest
            carry = buf[FRONT + rest:FRONT + n].tobytes()
            self.base += rest
            del buf
            need = 0
            if frames.rest_len is not None:
                if frames.rest_len > limits.MAX_EVENT_RECORD_BYTES:
                    self.res.problems.append(ReadProblem(
                        name, f"a record declares {frames.rest_len:,} data bytes, over the "
                              f"{limits.MAX_EVENT_RECORD_BYTES:,}-byte limit (higgs_diag.limits."
                              f"MAX_EVENT_RECORD_BYTES); not read from here; {used(self.n_records)}",
                        offset=self.base, kind="unreadable"))
                    return
                need = frames.rest_len + 16 - len(carry)

    def _decode(self, buf: np.ndarray, frames) -> None:
        """The records of one chunk (``frames``): data CRCs, the fast path, protobuf for the rest."""
        F, res, tags = FRONT, self.res, self.tags
        starts, lens = frames.starts, frames.lens
        R = len(starts)
        file_starts = starts + self.base  # for the problems
        self.n_records += R
        if R == 0:
            return
        ds = starts + (F + 12)
        stored = u32_at(buf, ds + lens)
        f_rec, f_step, f_tag, f_val, f_wall, checked, f_bad = fast_scalars(buf, ds, lens, np.arange(R), stored, tags)
        good = _data_crcs_ok(buf, ds, lens, stored, checked, f_bad)
        _report_bad_data(good, file_starts, lens, res.path, res.problems)
        todo = np.ones(R, dtype=bool)
        todo[f_rec] = False
        todo[~good] = False
        points: list[tuple] = []
        _decode_rest(buf, ds, lens, file_starts, np.flatnonzero(todo), good, res, points, tags, self.texts)
        self.n_good += int(good.sum())
        cols = _assemble(R, (f_rec, f_step, f_tag, f_val, f_wall), points, tags, self.cols)
        if cols is not None and not cols[4]:
            self.cols.append(cols[:4])

    def columns(self):
        """(step, tag_id, value, wall_time, tag names) of the whole file, or None without points."""
        if not self.cols.n:
            return None
        names = np.empty(len(self.tags.names), dtype=object)
        names[:] = self.tags.names
        return (*self.cols.take(), names)


class _Columns:
    """The points' columns (step int64, tag id int32, value float64, wall_time float64: 28 bytes a point),
    appended chunk by chunk into slabs (the first of ``FIRST`` points, each next one twice as large up to
    ``SLAB`` points), joined at the end one slab column at a time.

    Why not a list of per-chunk arrays joined with np.concatenate: the join holds a second copy of every
    point, and the chunks' small arrays, once freed, stay in the heap (resident) among other allocations: the
    reader peaked at 93 bytes a point. Why not one array per column grown by copying: every growth copies and
    first-touches the column again (measured 2-4x slower than slabs on a 19.65 M-point file). A full-size slab
    column (16-32 MB) lives in its own anonymous mapping: the part of the last slab not filled is never touched
    (not resident), and each slab column is freed as soon as it is copied into the joined column, so the peak
    is the points' 28 bytes plus one slab column, whatever the file's size; a small file allocates a small
    slab. One slab is handed on without a copy."""

    FIRST = 1 << 16  # points in the first slab
    SLAB = 1 << 22  # points in a full-size slab
    DTYPES = (np.int64, np.int32, np.float64, np.float64)

    def __init__(self) -> None:
        self.n = 0
        self.slabs: list[list] = []
        self.cap = 0  # points the last slab holds
        self.fill = 0  # points in it

    def append(self, cols) -> None:
        m, off = len(cols[0]), 0
        while off < m:
            if self.fill == self.cap:
                self.cap = min(self.SLAB, 2 * self.cap) if self.cap else min(self.FIRST, self.SLAB)
                self.slabs.append([np.empty(self.cap, dtype=d) for d in self.DTYPES])
                self.fill = 0
            k = min(m - off, self.cap - self.fill)
            for slab, a in zip(self.slabs[-1], cols):
                slab[self.fill:self.fill + k] = a[off:off + k]
            self.fill += k
            off += k
        self.n += m

    def reserve(self, m: int) -> list[np.ndarray] | None:
        """The slots of the next ``m`` points (step, tag id, value, wall_time views into the slab being filled), to
        be written by the caller, when they fit in that slab; None otherwise (then :meth:`append`)."""
        if not self.slabs or self.fill + m > self.cap:
            return None
        views = [a[self.fill:self.fill + m] for a in self.slabs[-1]]
        self.fill += m
        self.n += m
        return views

    def release(self, m: int) -> None:
        """Give back the last ``m`` points reserved."""
        self.fill -= m
        self.n -= m

    def take(self) -> list[np.ndarray]:
        """The columns of the n points; this object forgets them."""
        n, slabs = self.n, self.slabs
        self.__init__()
        if len(slabs) == 1:
            return [a[:n] for a in slabs[0]]
        out = []
        for k, dtype in enumerate(self.DTYPES):
            col = np.empty(n, dtype=dtype)
            pos = 0
            for slab in slabs:
                size = min(len(slab[k]), n - pos)
                col[pos:pos + size] = slab[k][:size]
                slab[k] = None  # unmapped now: the peak holds one slab column beyond the points
                pos += size
            out.append(col)
        return out


def _bounded_texts(texts: dict[str, str], res: EventFileResult) -> dict[str, str]:
    """The text summaries as written, except those the run is configured from (``args``, ``model_config``)
    when they are outside the limits: longer than ``limits.MAX_TEXT_SUMMARY_CHARS`` or deeper than
    ``limits.MAX_JSON_DEPTH`` (left out with a problem), or a JSON object holding numbers out of range (NaN,
    Infinity, beyond int64: those values are left out with a problem and the object re-serialised). A text
    that is not JSON is handed on as is (the run loader says so) unless it holds an integer literal Python
    will not convert (more than 4,300 digits). Every config text handed on is therefore JSON that
    ``json.loads`` reads without an exception other than ``JSONDecodeError``."""
    out = {}
    for tag, text in texts.items():
        if tag in CONFIG_TEXTS:
            text = _bounded_config_text(tag, text, res)
            if text is None:
                continue
        out[tag] = text
    return out


_HUGE_INT = re.compile(r"[0-9]{4000}")
_LONG_INT = re.compile(r"[0-9]{%d}" % (limits.MAX_INT_DIGITS + 1))


def _bounded_config_text(tag: str, text: str, res: EventFileResult) -> str | None:
    def refuse(why: str) -> None:
        res.problems.append(ReadProblem(res.path, f"the `{tag}` text summary {why}; ignored", kind="unreadable"))

    if len(text) > limits.MAX_TEXT_SUMMARY_CHARS:
        return refuse(f"has {len(text):,} characters, over the {limits.MAX_TEXT_SUMMARY_CHARS:,} limit "
                      f"(higgs_diag.limits.MAX_TEXT_SUMMARY_CHARS)")
    try:
        obj = loads_bounded(text)
    except JSONLimitError as e:
        return refuse(f"is {e.msg}")
    except ValueError:  # not JSON: the run loader reports it, unless its json.loads would stop on a huge integer
        return refuse("is not JSON and holds an integer of more than 4,000 digits") if _HUGE_INT.search(text) else text
    if is_out_of_range(obj):
        return refuse("is an integer out of range")
    dropped: list[str] = []
    clean = _in_range(obj, tag, dropped)
    if not dropped:  # re-serialised all the same when a long integer hid under a repeated key
        return json.dumps(clean) if _LONG_INT.search(text) else text
    res.problems.append(ReadProblem(
        res.path, f"the `{tag}` text summary has {len(dropped)} value(s) out of range "
                  f"({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}; NaN, Infinity or beyond "
                  f"int64): left out", kind="out-of-range"))
    return json.dumps(clean) if isinstance(clean, dict) else None


def _in_range(v, where: str, dropped: list):
    """``v`` without numbers out of range (keys removed, list items set to null); ``dropped`` gets their paths.
    The recursion is bounded: the JSON was checked against ``limits.MAX_JSON_DEPTH``."""
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if _bad_number(x):
                dropped.append(f"{k} {_number_text(x)}")
            else:
                out[k] = _in_range(x, f"{where}.{k}", dropped)
        return out
    if isinstance(v, list):
        out_list = []
        for i, x in enumerate(v):
            if _bad_number(x):
                dropped.append(f"{where}[{i}] {_number_text(x)}")
                out_list.append(None)
            else:
                out_list.append(_in_range(x, f"{where}[{i}]", dropped))
        return out_list
    return v


def _bad_number(x) -> bool:
    if is_out_of_range(x):
        return True
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return abs(x) > limits.MAX_CONFIG_NUMBER
    if isinstance(x, float):
        return not math.isfinite(x) or abs(x) > limits.MAX_CONFIG_NUMBER
    return False


def _number_text(x) -> str:
    return repr(x) if is_out_of_range(x) else f"{float(x):g}"


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


def _assemble(R: int, fast: tuple, points: list, tags: Tags, slots: "_Columns | None" = None):
    """(step, tag_id, value, wall_time, written) in file order, from the fast path's columns
    (record, step, tag_id, value, wall_time; one point per record) and the protobuf path's points
    (record, step, tag_id, value, wall_time) tuples, in record order; None when there are no points.
    ``slots.reserve(n)`` may give the four columns to write into (``written`` is then True)."""
    f_rec = fast[0]
    if not points and len(f_rec) == R:  # every record one fast point: record r is point r
        total, pos = R, None
    else:
        cnt = np.zeros(R, dtype=np.int64)
        cnt[f_rec] = 1
        if points:
            p_rec = np.fromiter((p[0] for p in points), dtype=np.int64, count=len(points))
            np.add.at(cnt, p_rec, 1)
        total = int(cnt.sum())
        pos = np.cumsum(cnt) - cnt
    if not total:
        return None
    out = slots.reserve(total) if slots is not None else None
    written = out is not None
    if out is None:
        out = [np.empty(total, dtype=d) for d in (np.int64, np.int32, np.float64, np.float64)]
    step, tid, val, wall = out
    try:
        at = f_rec if pos is None else pos[f_rec]
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
    except BaseException:
        if written:  # nothing of this chunk is kept, as when it is assembled apart
            slots.release(total)
        raise
    return step, tid, val, wall, written
