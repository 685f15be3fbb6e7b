"""TFRecord framing: writing it, and finding every record of a file (with the header CRC checks).

A file is a sequence of records::

    uint64 length (LE) | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)

The chain of record starts is found without a Python loop over records: every position whose byte 12
further on is ``0x09`` (an Event's first field, ``wall_time``) and whose declared length fits in the file
is a candidate start, pointing to ``start + 16 + length``. When each candidate points to the next one (the
usual case) the chain is all of them; otherwise candidates that no chain from byte 0 reaches are pruned
(in-degree zero, repeated) and the survivors, in position order, are the walk from byte 0. Where the chain
leaves the candidates (an Event without ``wall_time``, a truncated tail, garbage) a sequential walk takes
over, so the result is always exactly the sequential walk's (a property test checks it on arbitrary bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bytebuf import u32_at, u64_at
from .crc32c import crc32c_segments, header_crcs, mask
from .model import ReadProblem

__all__ = ["frame_records", "walk", "walk_seq", "Frames", "check_frames", "used"]


def frame_records(payloads) -> bytes:
    """TFRecord framing of a sequence of payloads (bytes): the inverse of the reader's framing."""
    payloads = [bytes(p) for p in payloads]
    n = len(payloads)
    if n == 0:
        return b""
    lens = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=n)
    blob = b"".join(payloads)
    starts = np.cumsum(lens) - lens
    dcrc = mask(crc32c_segments(blob, starts, lens)).astype("<u4")
    hdr = np.zeros((n, 12), dtype=np.uint8)
    hdr[:, :8] = lens.astype("<u8").view(np.uint8).reshape(n, 8)
    hcrc = mask(crc32c_segments(hdr[:, :8].tobytes(), np.arange(n) * 8, np.full(n, 8))).astype("<u4")
    hdr[:, 8:] = hcrc.view(np.uint8).reshape(n, 4)
    hb, tb = hdr.tobytes(), dcrc.tobytes()
    parts = []
    for i, p in enumerate(payloads):
        parts.append(hb[12 * i:12 * i + 12])
        parts.append(p)
        parts.append(tb[4 * i:4 * i + 4])
    return b"".join(parts)


# ------------------------------------------------------------------------------------------------
# The chain of record starts
# ------------------------------------------------------------------------------------------------
def walk_seq(buf: np.ndarray, F: int, n: int, pos: int, starts: list, lens: list, limit: int = -1) -> int:
    """Walk records from file offset ``pos``: append every start whose 12-byte header is in the file
    and its declared length. Stops after a record that does not fit (truncated), at the end, or after
    ``limit`` records. Returns the offset after the last complete record."""
    mv = memoryview(buf)
    while pos + 12 <= n and limit != 0:
        L = int.from_bytes(mv[F + pos:F + pos + 8], "little")
        starts.append(pos)
        lens.append(min(L, n + 1))
        if pos + 16 + L > n:
            return pos
        pos += 16 + L
        limit -= 1
    return pos


_ALL = object()  # _chain's answer when every candidate is on the chain


def _chain(p: np.ndarray, nxt: np.ndarray):
    """Indices of the chain from p[0] in the graph i -> the candidate at nxt[i] (p sorted, nxt > p).
    Candidates no chain from p[0] reaches are pruned (in-degree zero, repeatedly); the survivors are
    exactly the chain. _ALL when that is every candidate; None when pruning does not settle quickly
    (pathological data)."""
    m = len(p)
    succ = np.arange(1, m + 1)
    direct = np.zeros(m, dtype=bool)
    direct[:-1] = nxt[:-1] == p[1:]  # the usual case: the next candidate is the next record
    if direct[:-1].all():
        return _ALL
    other = np.flatnonzero(~direct)
    s = np.searchsorted(p, nxt[other])
    hit = s < m
    hit[hit] = p[s[hit]] == nxt[other][hit]
    succ[other] = np.where(hit, s, m)
    alive = np.ones(m, dtype=bool)
    for _ in range(64):
        t = succ[alive]
        indeg = np.bincount(t, minlength=m + 1)[:m]
        kill = alive & (indeg == 0)
        kill[0] = False
        if not kill.any():
            chain = np.flatnonzero(alive)
            if chain.size > 1 and not np.array_equal(succ[chain[:-1]], chain[1:]):
                return None
            return chain
        alive &= ~kill
    return None


def _candidates(buf: np.ndarray, F: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(p, Lp): the candidate record starts (sorted, 0 always among them) whose byte 12 further on is 0x09
    and whose declared length Lp fits in the file."""
    d = buf[F + 12:F + n - 3]  # q: positions whose data[0] would be 0x09 (Event.wall_time's key)
    q = np.concatenate([np.flatnonzero(d[c:c + (1 << 20)] == 0x09) + c for c in range(0, d.size, 1 << 20)])
    if q.size == 0 or q[0] != 0:
        q = np.concatenate(([0], q))
    L = u64_at(buf, q + F)
    ok = L < np.uint64(n)
    Lp = np.where(ok, L, np.uint64(n)).view(np.int64)
    del L
    ok &= Lp <= n - 16 - q  # the record fits in the file
    if ok.all():
        return q, Lp
    return q[ok], Lp[ok]


def _bad_header(buf: np.ndarray, F: int, pos: int) -> bool:
    return bool(header_crcs(buf, np.array([pos + F]))[0] != u32_at(buf, np.array([pos + F + 8]))[0])


def walk(buf: np.ndarray, F: int, n: int, stop_at_bad_header: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every record start from byte 0 (whose 12-byte header is in the file) and its declared length,
    exactly as a sequential walk finds them; vectorised where the data allows. With ``stop_at_bad_header``
    the sequential parts stop after a record whose header CRC does not match (nothing after it is trusted, and
    a run of zero bytes would otherwise be walked as 16-byte records one by one)."""
    parts_s: list[np.ndarray] = []
    parts_l: list[np.ndarray] = []
    pos = 0
    if n >= 28:
        p, Lp = _candidates(buf, F, n)
        nxt = p + 16 + Lp
        reentries = 0
        s_list: list[int] = []
        l_list: list[int] = []
        while pos + 12 <= n:
            i = int(np.searchsorted(p, pos))
            if i < len(p) and p[i] == pos and reentries < 16:
                reentries += 1
                ch = _chain(p[i:], nxt[i:])
                if ch is None:
                    break
                if s_list:
                    parts_s.append(np.asarray(s_list, dtype=np.int64))
                    parts_l.append(np.asarray(l_list, dtype=np.int64))
                    s_list, l_list = [], []
                if ch is _ALL:
                    parts_s.append(p[i:])
                    parts_l.append(Lp[i:])
                    pos = int(nxt[-1])
                else:
                    parts_s.append(p[i:][ch])
                    parts_l.append(Lp[i:][ch])
                    pos = int(nxt[i:][ch[-1]])
                continue
            if reentries >= 16:
                break
            before = len(s_list)
            pos2 = walk_seq(buf, F, n, pos, s_list, l_list, limit=1)
            if len(s_list) > before and pos2 == pos:  # truncated record: done
                pos = n
                break
            if stop_at_bad_header and len(s_list) > before and _bad_header(buf, F, pos):
                pos = n
                break
            pos = pos2
        if s_list:
            parts_s.append(np.asarray(s_list, dtype=np.int64))
            parts_l.append(np.asarray(l_list, dtype=np.int64))
    if pos + 12 <= n:
        s_list, l_list = [], []
        if stop_at_bad_header:
            while pos + 12 <= n:
                pos2 = walk_seq(buf, F, n, pos, s_list, l_list, limit=1)
                if pos2 == pos or _bad_header(buf, F, pos):
                    break
                pos = pos2
        else:
            walk_seq(buf, F, n, pos, s_list, l_list)
        parts_s.append(np.asarray(s_list, dtype=np.int64))
        parts_l.append(np.asarray(l_list, dtype=np.int64))
    if not parts_s:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if len(parts_s) == 1:
        return parts_s[0], parts_l[0]
    return np.concatenate(parts_s), np.concatenate(parts_l)


# ------------------------------------------------------------------------------------------------
# The records a reader can trust
# ------------------------------------------------------------------------------------------------
def used(n: int, before: str = "it") -> str:
    """'the 1 record before it was used' / 'the 12 records before it were used'."""
    return f"the {n:,} record before {before} was used" if n == 1 else f"the {n:,} records before {before} were used"


@dataclass
class Frames:
    """The complete records of a file (or of one chunk of it) with a valid header CRC, up to the first bad
    header. Offsets are relative to the buffer's first byte (``base`` in the file)."""

    starts: np.ndarray  # offset of every record
    lens: np.ndarray  # its declared data length
    stop: ReadProblem | None = None  # why reading stopped before the end of the file, if it did
    fatal: ReadProblem | None = None  # the file is not TFRecord at all (its first header is bad): no records
    rest: int | None = None  # (not at the end of the file) where the bytes to carry into the next chunk start
    rest_len: int | None = None  # the declared data length of the record that starts there, when its header is in


def check_frames(buf: np.ndarray, F: int, n: int, name: str, *, base: int = 0, eof: bool = True,
                 before: int = 0) -> Frames:
    """Walk the records of the n bytes at buf[F:] (n >= 12 for a whole file) and check their header CRCs: the
    framing is trusted up to the first bad one. At the end of the file (``eof``) a truncated last record or
    stray bytes are dropped with a problem; before it they are the ``rest`` to read on from. ``base`` is the
    file offset of buf[F] and ``before`` the number of records before it (for the problems' offsets and
    counts)."""
    starts, lens = walk(buf, F, n, stop_at_bad_header=True)
    R = len(starts)
    hcrc = header_crcs(buf, starts + F)
    bad = np.flatnonzero(hcrc != u32_at(buf, starts + F + 8))
    if bad.size:
        b = int(bad[0])
        if b == 0 and base == 0:
            return Frames(starts[:0], lens[:0], fatal=ReadProblem(
                name, "not a TensorBoard event file: its first 12 bytes are not a valid record header "
                      "(length CRC mismatch)", offset=0, kind="unreadable", fatal=True))
        stop = ReadProblem(
            name, f"record header CRC mismatch (declared length {int(lens[b]):,}); the framing is lost from "
                  f"here; {used(before + b)}", offset=base + int(starts[b]), kind="crc")
        return Frames(starts[:b], lens[:b], stop=stop)
    if R and int(starts[-1]) + 16 + int(lens[-1]) > n:
        s0 = int(starts[-1])
        L0 = int(u64_at(buf, np.array([s0 + F]))[0])
        if not eof:
            return Frames(starts[:R - 1], lens[:R - 1], rest=s0, rest_len=L0)
        present = n - s0 - 12
        what = (f"declared {L0:,} data bytes, {present:,} present" if present < L0
                else f"declared {L0:,} data bytes, its data CRC is cut off")
        stop = ReadProblem(name, f"truncated final record ({what}); {used(before + R - 1)}", offset=base + s0,
                           kind="truncated")
        return Frames(starts[:R - 1], lens[:R - 1], stop=stop)
    end = int(starts[-1]) + 16 + int(lens[-1]) if R else 0
    if not eof:
        return Frames(starts, lens, rest=end)
    stop = None
    if end < n:
        stop = ReadProblem(
            name, f"truncated: {n - end} stray bytes after the last record (a record header needs 12); "
                  f"{used(before + R, 'them')}", offset=base + end, kind="truncated")
    return Frames(starts, lens, stop=stop)
