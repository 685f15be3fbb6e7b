"""Reading a large ``trainer_state.json`` in pieces, so memory grows with the points kept, not with the file.

A byte scan (numpy, block by block, carrying the string/escape/depth state across blocks) finds the top-level
``"log_history": [`` and the commas that separate its entries (depth 2, outside strings). The entries are cut
into pieces of about ``chunk`` bytes at those commas; each piece is parsed (``[`` + piece + ``]``, the fast
parser, the standard library's when it must), turned into columns by the same ``_Flat`` the whole-file path uses,
and freed. What lies outside log_history (the other fields) is kept and parsed at the end as a state with an
empty log_history. The scan applies the nesting limit itself (``limits.MAX_JSON_DEPTH``).

Anything else (damage, a cut-off file, a structure that is not an object holding a log_history list) makes
:func:`read_streaming` return None when the caller may parse the file whole (it is not too large for that):
the problems then read exactly as a small file's. A file too large for that keeps the entries before the damage
with the same problem a small file gets, or is not read when the damage is outside log_history."""
from __future__ import annotations

import codecs
import json
import re

import numpy as np

from .. import limits
from .model import ReadProblem, TrainerStateInfo
from . import trainer_state as ts

_SPECIAL = np.zeros(256, dtype=bool)
_SPECIAL[list(b'"\\[]{},')] = True
_DELTA = np.zeros(256, dtype=np.int32)
_DELTA[list(b"[{")] = 1
_DELTA[list(b"]}")] = -1
_KEY = re.compile(rb'(\\*)"log_history"\s*:\s*$')


class Odd(Exception):
    """Not a plain state (``msg``, ``offset``: a byte offset or None)."""

    def __init__(self, msg: str, offset: int | None = None):
        super().__init__(msg)
        self.msg, self.offset = msg, offset


class Splitter:
    """Feeds blocks of a state file; returns the log_history pieces completed (bytes between separators)."""

    def __init__(self, chunk: int):
        self.chunk = max(int(chunk), 1)
        self.depth, self.in_str, self.bs_run = 0, False, 0
        self.off = 0  # offset of the next block
        self.phase = 0  # 0 before log_history, 1 in it, 2 after it
        self.head, self.body, self.tail = bytearray(), bytearray(), bytearray()
        self.body_off = 0  # offset of body[0]
        self.n_pieces = 0
        self.after_sep = False  # the body starts after a separator (a piece must follow it)

    def _scan(self, a: np.ndarray):
        """(positions, bytes, depth before, structural mask) of the special bytes of a block."""
        pos = np.flatnonzero(_SPECIAL[a])
        if pos.size == 0:
            self.bs_run = 0
            return None
        ch = a[pos]
        bs = ch == 0x5C
        quote = ch == 0x22
        escaped = None
        if self.bs_run or bs.any():
            contig = np.empty(pos.size, dtype=bool)  # a backslash right before this byte
            contig[0] = pos[0] == 0 and self.bs_run > 0
            contig[1:] = bs[:-1] & (pos[1:] == pos[:-1] + 1)
            idx = np.arange(pos.size)
            brk = np.maximum.accumulate(np.where(contig, -1, idx))
            run = np.where(brk < 0, idx + self.bs_run, idx - brk)  # backslashes right before each special byte
            escaped = run % 2 == 1
            quote &= ~escaped
        toggles = np.cumsum(quote, dtype=np.int32)
        inside = ((toggles - quote) & 1).astype(bool) ^ self.in_str
        struct = ~inside if escaped is None else ~inside & ~escaped
        delta = np.where(struct, _DELTA[ch], 0)
        after = self.depth + np.cumsum(delta, dtype=np.int32)
        over = np.flatnonzero(after > limits.MAX_JSON_DEPTH)
        if over.size:
            raise Odd(f"nested deeper than {limits.MAX_JSON_DEPTH} levels (higgs_diag.limits.MAX_JSON_DEPTH)",
                      self.off + int(pos[over[0]]))
        self.depth = int(after[-1])
        self.in_str = bool(inside[-1]) ^ bool(quote[-1])
        self.bs_run = int(run[-1]) + 1 if escaped is not None and bs[-1] and pos[-1] == a.size - 1 else 0
        return pos, ch, after - delta, struct

    def feed(self, block: bytes) -> list[bytes]:
        scan = self._scan(np.frombuffer(block, dtype=np.uint8))
        start = 0
        if self.phase == 0:
            start = self._find_history(block, scan)
            if self.phase == 0:
                return []
        pieces: list[bytes] = []
        if self.phase == 1:
            start = self._body(block, scan, start, pieces)
        if self.phase == 2:
            self.tail += block[start:]
            if len(self.tail) > limits.STATE_MAX_REST_BYTES:
                raise Odd(f"more than {limits.STATE_MAX_REST_BYTES:,} bytes after log_history "
                          f"(higgs_diag.limits.STATE_MAX_REST_BYTES)", self.off)
        self.off += len(block)
        return pieces

    def _find_history(self, block: bytes, scan) -> int:
        """Before log_history: the offset in ``block`` where its body starts, or the block is kept as header."""
        if scan is not None:
            pos, ch, before, struct = scan
            for c in np.flatnonzero(struct & (ch == 0x5B) & (before == 1)).tolist():
                p = int(pos[c])
                m = _KEY.search(bytes(self.head[-4096:]) + block[max(0, p - 4096):p])
                if m and len(m.group(1)) % 2 == 0:
                    self.head += block[:p + 1]
                    if not self.head.lstrip()[:1] == b"{":
                        raise Odd("not a JSON object", 0)
                    self._check_head()
                    self.phase, self.body_off = 1, self.off + p + 1
                    return p + 1
        self.head += block
        self.off += len(block)
        if len(self.head) > limits.STATE_MAX_REST_BYTES:
            raise Odd(f"no log_history list in the first {limits.STATE_MAX_REST_BYTES:,} bytes "
                      f"(higgs_diag.limits.STATE_MAX_REST_BYTES)", 0)
        return len(block)

    def _check_head(self) -> None:
        """What comes before log_history must be valid JSON (the fields are parsed at the end)."""
        text = self.head.decode("utf-8", "replace")
        try:
            ts.bounded_decoder().decode(text + "]}")
        except json.JSONDecodeError as e:
            if e.pos < len(text):
                raise Odd(f"invalid JSON before log_history ({e.msg})", None) from None

    def _body(self, block: bytes, scan, start: int, pieces: list[bytes]) -> int:
        """In log_history: pieces cut at separators; returns where the rest (after log_history) starts."""
        end = len(block)
        seps = np.zeros(0, dtype=np.int64)
        if scan is not None:
            pos, ch, before, struct = scan
            inb = pos >= start
            closes = np.flatnonzero(inb & struct & (before == 2) & ((ch == 0x5D) | (ch == 0x7D)))
            if closes.size:
                end = int(pos[closes[0]])
                if ch[closes[0]] != 0x5D:
                    raise Odd("log_history closed by `}`", self.off + end)
            seps = pos[inb & struct & (before == 2) & (ch == 0x2C) & (pos < end)].astype(np.int64)
        base = len(self.body)
        self.body += block[start:end]
        rel = seps - start + base  # separators' positions in self.body
        i = 0
        while True:
            k = np.searchsorted(rel[i:], self.chunk, side="left") + i
            if k >= rel.size:
                break
            cut = int(rel[k])
            self._emit(pieces, cut)
            rel = rel - (cut + 1)
            i = k + 1
        if len(self.body) > limits.STATE_MAX_ENTRY_BYTES + self.chunk:
            raise Odd(f"a log_history entry of more than {limits.STATE_MAX_ENTRY_BYTES:,} bytes "
                      f"(higgs_diag.limits.STATE_MAX_ENTRY_BYTES)", self.body_off)
        if end < len(block):
            self.phase = 2
            pieces.append(self.last_piece())
        return end

    def _emit(self, pieces: list[bytes], cut: int) -> None:
        piece = bytes(self.body[:cut])
        if not piece.strip():
            raise Odd("an empty log_history entry", self.body_off)
        pieces.append(piece)
        del self.body[:cut + 1]
        self.body_off += cut + 1
        self.after_sep = True

    def last_piece(self) -> bytes:
        """The body after the last separator (when log_history was closed)."""
        piece = bytes(self.body)
        if self.after_sep and not piece.strip():
            raise Odd("a comma after the last log_history entry", self.body_off)
        self.body = bytearray()
        return piece


class _Fields:
    """The fields a damaged file's salvage takes: the first ``"key": value`` of each in the header, then in the
    damaged piece or what follows log_history (the whole-file salvage searches the log_history entries before
    the damage too: there an entry holding e.g. a ``max_steps`` key would be taken; HF's never do)."""

    def __init__(self, head: str):
        self.found = {k: m.group(1) for k in ts.SALVAGED_FIELDS
                      if (m := re.search(ts.field_pattern(k), head))}

    def scan(self, piece: bytes) -> None:
        for key in ts.SALVAGED_FIELDS:
            if key not in self.found and f'"{key}"'.encode() in piece:
                m = re.search(ts.field_pattern(key), piece.decode("utf-8", "replace"))
                if m:
                    self.found[key] = m.group(1)

    def data(self) -> dict:
        dec = ts.bounded_decoder()
        out = {}
        for key in ts.SALVAGED_FIELDS:  # in the order the whole-file salvage decodes them
            if key in self.found:
                try:
                    out[key] = dec.decode(self.found[key])
                except ValueError:
                    pass
        return out


def _parse_piece(piece: bytes) -> list | None:
    """The entries of one piece (``[`` + piece + ``]``), or None when it is not valid JSON."""
    data = ts.fast_loads(b"[" + piece + b"]")
    if data is ts.NOT_FAST:
        try:
            data = ts.bounded_decoder().decode("[" + piece.decode("utf-8") + "]")
        except (json.JSONDecodeError, RecursionError, UnicodeDecodeError):
            return None
    return data if isinstance(data, list) else None


def _chars(b: bytes) -> int:
    """Characters of UTF-8 bytes (continuation bytes do not start one)."""
    if b.isascii():
        return len(b)
    a = np.frombuffer(b, dtype=np.uint8)
    return len(b) - int(np.count_nonzero((a & 0xC0) == 0x80))


class _Stream:
    """One streamed read: the splitter, the columns, what the salvage of a damaged file needs."""

    def __init__(self, name: str, chunk: int):
        self.name = name
        self.split = Splitter(chunk)
        self.res = ts.StateResult(TrainerStateInfo(path=name))
        self.flat = ts._Flat(self.res, fast=True)
        self.n_entries = 0
        self.body_chars = 0  # characters of the log_history pieces done (with their separators)
        self.fields: _Fields | None = None
        self.utf8 = codecs.getincrementaldecoder("utf-8")()

    def check_utf8(self, block: bytes, final: bool = False) -> None:
        if block.isascii() and not self.utf8.getstate()[0] and not final:
            return
        try:
            self.utf8.decode(block, final)
        except UnicodeDecodeError as e:
            raise Odd(f"not UTF-8 text (byte {self.split.off + e.start})", self.split.off + e.start) from None

    def pieces(self, pieces: list[bytes]) -> None:
        if pieces and self.fields is None:
            self.fields = _Fields(self.split.head.decode("utf-8"))
        for piece in pieces:
            entries = _parse_piece(piece)
            if entries is None:
                raise _Damaged(piece)
            self.flat.add(entries)
            self.n_entries += len(entries)
            self.body_chars += _chars(piece) + 1


class _Damaged(Exception):
    def __init__(self, piece: bytes):
        self.piece = piece


def read_streaming(fh, name: str, chunk: int, whole_ok: bool) -> ts.StateResult | None:
    """The state read in pieces; None when the file should be parsed whole instead (``whole_ok``: it is small
    enough for that, and it is not a plain state)."""
    st = _Stream(name, chunk)
    total = 0
    try:
        while True:
            block = fh.read(chunk)
            if total == 0 and block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
            total += len(block)
            if total > limits.MAX_STATE_FILE_BYTES:
                raise Odd(f"more than {limits.MAX_STATE_FILE_BYTES:,} bytes (higgs_diag.limits)", None)
            st.check_utf8(block, final=not block)
            if not block:
                break
            st.pieces(st.split.feed(block))
        if st.split.phase == 1:  # cut off inside log_history
            raise _Damaged(bytes(st.split.body))
        if st.split.phase == 0:
            raise Odd("no top-level log_history list", None)
        return _finish(st, whole_ok)
    except (Odd, ts._TooDeep) as e:
        if whole_ok:
            return None
        what = e.msg if isinstance(e, Odd) else "nested too deeply"
        return ts.StateResult(None, problems=[ReadProblem(name, f"not read: {what}", offset=getattr(e, "offset", None),
                                                          kind="unreadable", fatal=True)])
    except _Damaged as d:
        return None if whole_ok else _salvage(st, d.piece, fh, chunk)


def _finish(st: _Stream, whole_ok: bool) -> ts.StateResult | None:
    """The fields (the file without its log_history entries, parsed), then the problems that sum up the rest."""
    head, tail = bytes(st.split.head), bytes(st.split.tail)
    if b'"log_history"' in tail:
        raise Odd("log_history twice", None)  # (the later one would win)
    doc = head + tail
    data = ts.fast_loads(doc)
    if data is ts.NOT_FAST:
        try:
            data = ts.loads_bounded(doc.decode("utf-8"), doc)
        except (json.JSONDecodeError, ts.JSONLimitError) as e:
            if whole_ok:
                return None
            st.fields = st.fields or _Fields(head.decode("utf-8"))
            st.fields.scan(tail)
            n_head = len(head.decode("utf-8"))
            pos = e.pos if e.pos < n_head else e.pos + st.body_chars - 1
            return _salvaged(st, e, pos, st.n_entries)
    if not isinstance(data, dict) or data.get("log_history") != []:
        raise Odd("not a HF Trainer state", None)
    ts.state_fields(data, st.res)
    ts.finish_state(st.res, st.flat, st.n_entries)
    return st.res


def _salvaged(st: _Stream, e, pos: int, n_entries: int) -> ts.StateResult:
    """The result of a damaged file: the entries before the damage, the fields found by the salvage's search."""
    if isinstance(e, json.JSONDecodeError):
        e = json.JSONDecodeError(e.msg, e.doc, e.pos)
    e.pos = pos
    st.res.problems.append(ts.salvage_problem(st.name, e, n_entries))
    ts.state_fields(st.fields.data(), st.res)
    ts.finish_state(st.res, st.flat, n_entries)
    return st.res


def _salvage(st: _Stream, piece: bytes, fh, chunk: int) -> ts.StateResult:
    """Damage inside log_history: the stdlib parser on the header + the damaged piece says what and where (the
    entries before the piece are replaced by one number: the parser is in the same state after it). The rest of
    the file is read block by block for the fields only."""
    head = st.split.head.decode("utf-8")
    st.fields = st.fields or _Fields(head)
    prefix = head + ("0," if st.body_chars else "")
    text = piece.decode("utf-8", "replace")
    st.fields.scan(piece)
    carry, read = piece[-4096:], 0
    while len(st.fields.found) < len(ts.SALVAGED_FIELDS) and read <= limits.MAX_STATE_FILE_BYTES:
        block = fh.read(chunk)
        if not block:
            break
        read += len(block)
        st.fields.scan(carry + block)
        carry = block[-4096:]
    try:
        ts.bounded_decoder().decode(prefix + text)
        err = json.JSONDecodeError("Expecting ',' delimiter", prefix + text, len(prefix + text))
    except json.JSONDecodeError as e:
        err = e
    except RecursionError:
        err = json.JSONDecodeError("nested too deeply for the JSON parser", prefix + text, len(prefix))
    at = max(err.pos - len(prefix), 0)
    entries = ts.salvage_entries(text[:at], 0)
    st.flat.add(entries)
    return _salvaged(st, err, len(head) + st.body_chars + at, st.n_entries + len(entries))
