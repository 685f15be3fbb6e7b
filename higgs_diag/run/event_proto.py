"""Decoding ``tensorboard.Event`` records: a vectorised fast path for HF/torch scalar events, protobuf for the rest.

HF/torch scalar events have one exact layout: ``Event{wall_time=1 (fixed64), step=2 (varint, absent when 0),
summary=5 {value=1 {tag=1 (string), simple_value=2 (fixed32)}}}``. Records of the same length and
step-varint width share every field offset, so such a group is gathered once (the same rows serve its data
CRC), checked byte for byte on its columns (every key, every length byte, the exact end) and decoded with
array views; tags are identified by comparing their bytes as uint64 words. Anything that does not match
exactly (file_version, text summaries, tensors, multi-value summaries, tags of 128+ bytes, tags that are not
UTF-8) goes through protobuf's ``Event.FromString``: the fast path gives what protobuf gives, or is not
taken (tested).

The protobuf classes are those that ship with the ``tensorboard`` package (``tensorboard.compat.proto``),
imported only when a record needs them. No TensorFlow, no torch.
"""
from __future__ import annotations

import numpy as np

from .bytebuf import rows
from .crc32c import crc_words, mask, zero_constant

__all__ = ["TEXT_SUFFIX", "Tags", "fast_scalars", "decode_event"]

TEXT_SUFFIX = "/text_summary"


class Tags:
    """Tag names in order of first appearance, and their ids (an index into ``names``)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []

    def id(self, tag: str) -> int:
        i = self.ids.get(tag)
        if i is None:
            i = self.ids[tag] = len(self.names)
            self.names.append(tag)
        return i


# ------------------------------------------------------------------------------------------------
# The fast path
# ------------------------------------------------------------------------------------------------
def _row_codes(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, first) for the columns of a 2-D uint32 array (K words, n rows: X[k] is word k of every row):
    equal rows share a code, first[c] is the first row with code c. Exact; a few passes over contiguous word
    rows per distinct row (few distinct tags per group)."""
    K, n = X.shape
    codes = np.full(n, -1, dtype=np.int64)
    first: list[int] = []
    r0 = 0
    while True:
        if len(first) == 8:  # many distinct rows: sort the rest
            rest = np.flatnonzero(codes < 0)
            _, f, inv = np.unique(np.ascontiguousarray(X[:, rest].T).view(f"V{4 * K}").reshape(-1),
                                  return_index=True, return_inverse=True)
            codes[rest] = inv.reshape(-1) + len(first)
            first.extend(rest[f].tolist())
            break
        eq = X[0] == X[0, r0]
        for k in range(1, K):
            eq &= X[k] == X[k, r0]
        codes[eq] = len(first)
        first.append(r0)
        left = np.flatnonzero(codes < 0)
        if left.size == 0:
            break
        r0 = int(left[0])
    return codes, np.asarray(first, dtype=np.int64)


def _layouts(buf: np.ndarray, ds: np.ndarray, lens: np.ndarray, recs: np.ndarray):
    """(cand, key): the records of ``recs`` that may have the scalar layout, sorted by layout key
    ``length * 11 + step varint width`` (file order within a key), and their keys; None when there are none."""
    L = lens[recs]
    cand = recs[(L >= 21) & (L <= 149)]
    if cand.size == 0:
        return None
    L = lens[cand]
    H = rows(buf, ds[cand] + 8, 8)  # data[8:16] of every candidate: the step key and varint
    has_step = H[:, 1] == 0x10
    # width of the step varint (0: no step field, i.e. step 0; -1: not this layout)
    width = has_step.astype(np.int16)
    alive = has_step & (H[:, 2] >= 0x80)
    for k in range(1, 10):
        if not alive.any():
            break
        width += alive
        if k < 6:
            alive &= H[:, 2 + k] >= 0x80
        else:  # steps >= 2**42 or negative: fetch the further bytes of those rows only
            sel = np.flatnonzero(alive)
            alive[sel] = buf[ds[cand[sel]] + 10 + k] >= 0x80
    width[alive] = -1  # more than 10 varint bytes
    width[width > L - 22] = -1  # no room left for a tag
    width[~has_step & (H[:, 1] != 0x2A)] = -1
    keep = np.flatnonzero(width >= 0)
    if keep.size == 0:
        return None
    key = (L[keep] * 11).astype(np.uint16) + width[keep].astype(np.uint16)  # (length, step width): a layout
    order = np.argsort(key, kind="stable")  # radix sort; file order within a layout
    return cand[keep[order]], key[order]


def _tag_ids(M: np.ndarray, X: np.ndarray, a: int, T: int, tags: Tags) -> np.ndarray:
    """The tag id of every row of M (T tag bytes at M[:, a + 6:]); -1 where the tag is not UTF-8. The rows are
    told apart by X, the uint32 words (one row of X per word, as in :func:`_decode_group`) that hold the tag
    bytes and otherwise only bytes every row has the same (checked before)."""
    e = a + 6 + T
    codes, first = _row_codes(X)
    gid = np.empty(len(first), dtype=np.int64)
    for c, r in enumerate(first.tolist()):
        try:
            gid[c] = tags.id(M[r, a + 6:e].tobytes().decode("utf-8"))
        except UnicodeDecodeError:  # protobuf rejects it: leave it to the fallback
            gid[c] = -1
    return gid[codes]


def _word_checks(pad: int, checks: tuple) -> dict[int, tuple[int, int]]:
    """{word: (mask, expected)} for byte checks ((offset in the payload, value), ...) of rows left-padded by
    ``pad`` bytes and read as little-endian uint32 words."""
    words: dict[int, tuple[int, int]] = {}
    for k, v in checks:
        j, s = divmod(pad + k, 4)
        m, e = words.get(j, (0, 0))
        words[j] = (m | 0xFF << 8 * s, e | v << 8 * s)
    return words


def _decode_group(buf: np.ndarray, ds: np.ndarray, stored: np.ndarray, g: np.ndarray, Lg: int, sv: int,
                  tags: Tags):
    """One layout group ``g`` (records of Lg data bytes with an sv-byte step varint): None when the layout
    cannot hold a 1..127-byte tag (not checked here); else (CRC-mismatched records, decoded columns
    (records, step, tag_id, value, wall_time) or None when no record has the layout exactly).

    The payloads are gathered once, left-padded to P (a multiple of 4) bytes, and transposed into W, P/4 rows of
    uint32 words (W[j]: word j of every record, contiguous): W serves the CRC, the byte checks (a masked compare
    per word that holds checked bytes), the step varint, the value (the last word) and the wall time."""
    a = 9 if sv == 0 else 10 + sv  # offset of the summary key
    T = Lg - a - 11
    if T < 1 or Lg - a - 2 > 127:
        return None
    P = (Lg + 3) & ~3
    pad = P - Lg
    Mc = rows(buf, ds[g] - pad, P)
    W = np.ascontiguousarray(Mc.view("<u4").T)  # (P / 4, ng)
    raw = crc_words(W, pad)
    ok = mask(raw ^ np.uint32(zero_constant(Lg) ^ 0xFFFFFFFF)) == stored[g]
    bad = g[~ok]
    checks = ((0, 0x09), (a, 0x2A), (a + 1, Lg - a - 2), (a + 2, 0x0A), (a + 3, Lg - a - 4), (a + 4, 0x0A),
              (a + 5, T), (Lg - 5, 0x15))
    for j, (m, e) in _word_checks(pad, checks).items():
        ok &= (W[j] & np.uint32(m)) == np.uint32(e)
    M = Mc[:, pad:]
    if not ok.all():
        keep = np.flatnonzero(ok)
        if keep.size == 0:
            return bad, None
        g, M, W = g[keep], M[keep], W[:, keep]
    # the tag's words: from the one holding payload byte a + 6 (its bytes before the tag, from a + 3 on, were
    # checked above) to the one before the last (which ends with the checked 0x15 key); the last is the value
    tid = _tag_ids(M, W[(pad + a + 6) // 4:P // 4 - 1], a, T, tags)
    if (tid < 0).any():
        keep = np.flatnonzero(tid >= 0)
        g, tid, W = g[keep], tid[keep], W[:, keep]
    step = np.zeros(len(g), dtype=np.uint64)
    for k in range(sv):
        j, s = divmod(pad + 10 + k, 4)
        step |= ((W[j] >> np.uint32(8 * s)) & np.uint32(0x7F)).astype(np.uint64) << np.uint64(7 * k)
    val = W[-1].view("<f4")  # the payload's last 4 bytes: the last word
    j, s = divmod(pad + 1, 4)  # wall_time: 8 bytes from payload byte 1
    wall = W[j].astype(np.uint64) | (W[j + 1].astype(np.uint64) << np.uint64(32))
    if s:
        wall = (wall >> np.uint64(8 * s)) | (W[j + 2].astype(np.uint64) << np.uint64(64 - 8 * s))
    return bad, (g, step.view(np.int64), tid, val, wall.view("<f8"))


def fast_scalars(buf: np.ndarray, ds: np.ndarray, lens: np.ndarray, recs: np.ndarray, stored: np.ndarray,
                 tags: Tags):
    """Check the data CRC of, and decode, the records ``recs`` (indices; data at buf[ds[i]:ds[i]+lens[i]],
    masked CRC stored[i]) that have exactly the layout Event{wall_time, [step], summary{value{tag,
    simple_value}}} with 1-byte length varints. One gather per layout serves the CRC and the decoding.
    Returns (records, step, tag_id, value, wall_time) of the records decoded (in no particular order),
    the records whose CRC was checked here, and those among them whose CRC does not match."""
    empty = tuple(np.zeros(0, dtype=d) for d in ("i8", "i8", "i8", "f8", "f8", "i8", "i8"))
    found = _layouts(buf, ds, lens, recs)
    if found is None:
        return empty
    cand, key_sorted = found
    del found
    cuts = np.flatnonzero(np.diff(key_sorted)) + 1
    n = cand.size
    out = [np.empty(n, dtype=d) for d in ("i8", "i8", "i8", "f8", "f8")]  # rec, step, tag id, value, wall
    filled = 0
    checked = []
    bad = []
    for i0, g in zip(np.r_[0, cuts].tolist(), np.split(cand, cuts)):
        Lg, sv = divmod(int(key_sorted[i0]), 11)
        res = _decode_group(buf, ds, stored, g, Lg, sv, tags)
        if res is None:
            continue
        checked.append(g)
        if res[0].size:
            bad.append(res[0])
        if res[1] is None:
            continue
        sl = slice(filled, filled + len(res[1][0]))
        filled += len(res[1][0])
        for o, col in zip(out, res[1]):
            o[sl] = col
    cat = [np.concatenate(x) if x else np.zeros(0, dtype=np.int64) for x in (checked, bad)]
    return (*(o[:filled] for o in out), *cat)


# ------------------------------------------------------------------------------------------------
# The protobuf path
# ------------------------------------------------------------------------------------------------
# tensorflow DataType enum values -> numpy dtype, for single-element tensors read as scalars
_NUMERIC_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 14: "bfloat16",
                   17: "<u2", 19: "<f2", 22: "<u4", 23: "<u8"}
_SCALAR_PLUGINS = ("", "scalars")


def _tensor_scalar(t) -> float | None:
    """The value of a single-element numeric TensorProto, or None."""
    code = int(t.dtype)
    dt = _NUMERIC_DTYPES.get(code)
    if dt is None:
        return None
    size = 1
    for d in t.tensor_shape.dim:
        size *= d.size
    if size != 1:
        return None
    if t.tensor_content:
        if dt == "bfloat16":
            raw = np.frombuffer(t.tensor_content, dtype="<u2")
            return float((raw.astype(np.uint32) << np.uint32(16)).view(np.float32)[0]) if raw.size == 1 else None
        arr = np.frombuffer(t.tensor_content, dtype=dt)
        return float(arr[0]) if arr.size == 1 else None
    if code == 1:
        vals = t.float_val
    elif code == 2:
        vals = t.double_val
    elif code in (19, 14):
        bits = list(t.half_val)
        if not bits:
            return 0.0
        b = bits[-1] & 0xFFFF
        if code == 19:
            return float(np.array([b], dtype=np.uint16).view(np.float16)[0])
        return float(np.array([b << 16], dtype=np.uint32).view(np.float32)[0])
    elif code == 9:
        vals = t.int64_val
    elif code == 22:
        vals = t.uint32_val
    elif code == 23:
        vals = t.uint64_val
    else:
        vals = t.int_val
    return float(vals[-1]) if len(vals) else 0.0  # TF repeats the last value; none means zeros


def _tensor_text(t) -> str | None:
    if int(t.dtype) != 7:  # DT_STRING
        return None
    vals = [v.decode("utf-8", errors="replace") for v in t.string_val]
    return "\n".join(vals) if vals else ""


def decode_event(data: bytes, rec: int, points: list, tags: Tags, texts: dict) -> str | None:
    """Protobuf path for one record: append (rec, step, tag_id, value, wall_time) for every scalar,
    store text summaries; returns the file_version if the event has one. Raises DecodeError."""
    from tensorboard.compat.proto import event_pb2

    ev = event_pb2.Event.FromString(data)
    if ev.HasField("summary"):
        step, wall = int(ev.step), float(ev.wall_time)
        for v in ev.summary.value:
            kind = v.WhichOneof("value")
            if kind == "simple_value":
                points.append((rec, step, tags.id(v.tag), float(v.simple_value), wall))
            elif kind == "tensor":
                plugin = v.metadata.plugin_data.plugin_name
                if plugin == "text" or (plugin == "" and v.tag.endswith(TEXT_SUFFIX)):
                    text = _tensor_text(v.tensor)
                    if text is not None:
                        tag = v.tag[: -len(TEXT_SUFFIX)] if v.tag.endswith(TEXT_SUFFIX) else v.tag
                        texts[tag] = text
                        continue
                if plugin in _SCALAR_PLUGINS:
                    val = _tensor_scalar(v.tensor)
                    if val is not None:
                        points.append((rec, step, tags.id(v.tag), val, wall))
    return ev.file_version if ev.WhichOneof("what") == "file_version" else None
