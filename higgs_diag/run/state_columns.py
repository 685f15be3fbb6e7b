"""The trainer_state.json reader's fast path: msgspec's parse (NaN/Infinity literals quoted) and the columnar
flatten of log_history (``_Flat``), the same whether the history comes whole or in pieces (``state_stream``).
Values, problems and their order are those of the exact path (``trainer_state``); tests/test_trainer_state_fast.py
holds the two to it."""
from __future__ import annotations

import math
import operator
from itertools import chain, compress, repeat
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from .. import limits

if TYPE_CHECKING:
    from .trainer_state import StateResult

# Canonical names for keys some trainers log under another name.
KEY_ALIASES = {"lr": "learning_rate", "train/loss": "loss", "eval/loss": "eval_loss"}
_decode = msgspec.json.Decoder().decode

class _OutOfRange:
    """An integer literal with more than ``limits.MAX_INT_DIGITS`` digits: never converted to int."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a {self.digits}-digit integer>"


def is_out_of_range(v) -> bool:
    return isinstance(v, _OutOfRange)


def _to_float(v) -> float | None:
    """A number (or numeric string) as float; None for anything else, including integers out of range."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            return None
    if isinstance(v, str):
        s = v.strip()
        if len(s) > limits.MAX_NAME_CHARS:
            return None
        try:
            return float(s)  # accepts "nan", "inf", "1e-5"
        except ValueError:
            return None
    return None


def _to_int(v) -> int | None:
    """An integer field or step in [-MAX_STEP, MAX_STEP]; None otherwise (see :func:`_int_field`)."""
    f = _to_float(v)
    if f is None or not math.isfinite(f) or abs(f) > limits.MAX_STEP:
        return None
    return int(f)


def _show(v) -> str:
    if is_out_of_range(v):
        return repr(v)
    f = _to_float(v)
    if f is not None:
        return f"{f:g}"
    return type(v).__name__


# ------------------------------------------------------------------------------------------------------------
# The fast parser (msgspec) and its exact fallback
# ------------------------------------------------------------------------------------------------------------
NOT_FAST = object()  # fast_loads: only the exact (standard library) parser reads this text as it must
_CONSTANTS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def fast_loads(raw: bytes):
    """``raw`` parsed by msgspec (3x the standard library's speed, the same values), or :data:`NOT_FAST` when
    msgspec refuses it (invalid or cut-off JSON, lone surrogates, numbers beyond float, 4,301+ digit integers,
    nesting msgspec will not follow). The ``NaN``/``Infinity``/``-Infinity`` literals Python's json.dumps writes
    (msgspec refuses them) are quoted where they stand outside strings and the strings turned back into floats
    at the top level; deeper (log_history values) a numeric string reads as the same float. Integers are not
    bounded and the depth not checked here (:func:`_bounded`, :func:`_too_deep`)."""
    try:
        return _decode(raw)
    except (ValueError, RecursionError):
        pass
    quoted = _quote_constants(raw)
    if quoted is None:
        return NOT_FAST
    try:
        data = _decode(quoted)
    except (ValueError, RecursionError):
        return NOT_FAST
    if type(data) is str:
        return _CONSTANTS.get(data, data)
    if type(data) is dict:
        for k, v in data.items():
            if type(v) is str and v in _CONSTANTS:
                data[k] = _CONSTANTS[v]
    return data


def _quote_constants(raw: bytes) -> bytes | None:
    """``raw`` with its NaN/Infinity/-Infinity literals quoted (``"NaN"``), or None when there are none or a string
    holding exactly one of these words already exists (it could not be told from a quoted literal)."""
    if b"NaN" not in raw and b"Infinity" not in raw:
        return None
    if b'"NaN"' in raw or b'"Infinity"' in raw or b'"-Infinity"' in raw:
        return None
    a = np.frombuffer(raw, dtype=np.uint8)
    hits = []
    for word in (b"NaN", b"Infinity"):
        w = np.frombuffer(word, dtype=np.uint8)
        cand = np.flatnonzero(a[:a.size - len(w) + 1] == w[0])
        for j in range(1, len(w)):
            cand = cand[a[cand + j] == w[j]]
        hits.append(cand)
    quotes = np.flatnonzero(a == 0x22)
    if b"\\" in raw:  # a quote after an odd run of backslashes is escaped
        keep = np.ones(quotes.size, dtype=bool)
        for i in np.flatnonzero(a[np.maximum(quotes - 1, 0)] == 0x5C).tolist():
            j = int(quotes[i]) - 1
            while j >= 0 and raw[j] == 0x5C:
                j -= 1
            keep[i] = (quotes[i] - 1 - j) % 2 == 0
        quotes = quotes[keep]
    inside = [np.searchsorted(quotes, h) % 2 == 1 for h in hits]
    if not any(x.any() for x in inside):
        return raw.replace(b"Infinity", b'"Infinity"').replace(b'-"Infinity"', b'"-Infinity"').replace(b"NaN", b'"NaN"')
    out, at = [], 0  # some are inside strings: quote the others one by one
    spans = sorted([(int(p), 3) for p in hits[0][~inside[0]]] + [(int(p), 8) for p in hits[1][~inside[1]]])
    for p, n in spans:
        if n == 8 and p > 0 and raw[p - 1] == 0x2D:
            p, n = p - 1, 9
        out += [raw[at:p], b'"', raw[p:p + n], b'"']
        at = p + n
    out.append(raw[at:])
    return b"".join(out)


class _TooDeep(Exception):
    """The fast parser read JSON nested deeper than ``limits.MAX_JSON_DEPTH``: the exact path reports it."""


def _too_deep(obj, depth: int) -> bool:
    """Whether ``obj``, a value at nesting ``depth`` (the state object is 1), is or holds a list or object nested
    deeper than ``limits.MAX_JSON_DEPTH`` (what :func:`too_deep_at` finds in the text). Iterative."""
    stack = [(obj, depth)]
    while stack:
        o, d = stack.pop()
        if not isinstance(o, (dict, list)):
            continue
        if d > limits.MAX_JSON_DEPTH:
            return True
        stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o) if isinstance(v, (dict, list)))
    return False


def _bounded(v):
    """An integer whose JSON literal is longer than ``limits.MAX_INT_DIGITS`` as the out-of-range marker the exact
    parser gives (the fast parser returns it as an int); anything else unchanged."""
    if type(v) is int and not -10 ** (limits.MAX_INT_DIGITS - 1) < v < 10 ** limits.MAX_INT_DIGITS:
        return _OutOfRange(len(str(v)))  # the fast parser refuses more than 4,300 digits (str's limit)
    return v


_SMALL_GROUP = 8  # key groups with fewer entries (in one piece) are converted value by value


class _Flat:
    """log_history -> long columns in entry order, one piece (a list of entries) at a time: the same columns and
    problems whether the history comes whole or in pieces. Entries are grouped by their key tuple (a 143k-step
    history has a handful of distinct ones), each key of a group is one column converted by one numpy call when
    it holds only numbers; other columns (numeric strings, null, nested values, out-of-range integers) are
    converted value by value. ``fast``: the values come from the fast parser (integers not yet bounded, depth
    not yet checked: :class:`_TooDeep` is raised for nesting over the limit)."""

    def __init__(self, res: StateResult, fast: bool):
        self.res, self.fast = res, fast
        self.n = 0  # entries before this piece
        self.last = 0  # the step of the last entry that had one
        self.first: dict[tuple, int] = {}  # key tuple -> its first entry (the order problems are reported in)
        self.codes: dict[str, int] = {}  # canonical metric name -> code
        self.used: set[int] = set()  # the codes that have a point
        self.parts: list[tuple] = []
        self.examples: list[tuple] = []  # (order key, what) of out-of-range values
        self.n_range = 0

    def _problem(self, key: tuple, what: str) -> None:
        self.n_range += 1
        self.examples.append((key, what))
        if len(self.examples) > 64:
            self.examples = sorted(self.examples)[:3]

    def _step_column(self, col: list, eidx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(steps, mask of the valid ones or None when all are) of one group's ``step`` values; an out-of-range step
        is recorded (and, like a missing one, replaced by the step of the entry before it)."""
        if len(col) >= _SMALL_GROUP:
            try:
                arr = np.array(col)
            except (ValueError, TypeError, OverflowError):
                arr = None
            if (arr is not None and arr.ndim == 1 and arr.dtype.kind == "i"
                    and -limits.MAX_STEP <= int(arr.min()) and int(arr.max()) <= limits.MAX_STEP):
                return arr.astype(np.int64, copy=False), None
        out = np.zeros(len(col), dtype=np.int64)
        ok = np.zeros(len(col), dtype=bool)
        for r, v in enumerate(col):
            b = _bounded(v)
            st = _to_int(b)
            if st is not None:
                out[r], ok[r] = st, True
            elif is_out_of_range(b) or _to_float(b) is not None:
                self._problem((0, self.n + int(eidx[r])), f"step {_show(b)}")
            elif self.fast and _too_deep(v, 4):
                raise _TooDeep
        return out, ok

    def _fill_steps(self, steps: np.ndarray, has: np.ndarray) -> np.ndarray:
        """Entries without a valid step take the step of the entry before that had one."""
        if has.all():
            self.last = int(steps[-1])
            return steps
        at = np.maximum.accumulate(np.where(has, np.arange(len(has)), -1))
        out = np.where(at >= 0, steps[np.maximum(at, 0)], self.last)
        if has.any():
            self.last = int(steps[np.flatnonzero(has)[-1]])
        return out

    def _column(self, col: list, key: str, g0: int, eidx: np.ndarray, c: int):
        """(float64 values, present mask or None when all are present) of one key of a group."""
        if len(col) >= _SMALL_GROUP:
            try:
                arr = np.array(col)
            except (ValueError, TypeError, OverflowError):
                arr = None
            if arr is not None and arr.ndim == 1 and arr.dtype.kind in "fiub":
                f = arr.astype(np.float64)
                # int/uint/bool columns are in range; a float column may hold a converted integer out of range
                if arr.dtype.kind != "f" or not bool((np.abs(f) >= 1e29).any()):
                    return f, None
        out = np.full(len(col), np.nan)
        present = np.zeros(len(col), dtype=bool)
        for r, v in enumerate(col):
            b = _bounded(v)
            f = _to_float(b)
            if f is not None:
                out[r] = f
                present[r] = True
            elif is_out_of_range(b) or isinstance(b, int):
                self._problem((1, g0, self.n + int(eidx[r]), c), f"{key} {_show(b)}")
            else:
                self.res.non_numeric += 1
                if self.fast and _too_deep(v, 4):
                    raise _TooDeep
        return out, present

    @staticmethod
    def _groups(ents: list) -> list[tuple[tuple, np.ndarray, list | None]]:
        """(key tuple, indices, selectors or None for all) of the entries, in the order each key tuple first
        appears. When one key tuple is most of the entries (a training log), the others are found among the rest
        only."""
        top = tuple(ents[len(ents) // 2])
        sel = list(map(operator.eq, map(tuple, ents), repeat(top)))  # each key tuple made and let go at once
        same = np.array(sel, dtype=bool)
        if same.all():
            return [(top, np.arange(len(ents)), None)]
        rest = np.flatnonzero(~same)
        if len(rest) * 2 > len(ents):  # no key tuple dominates: group every entry
            rest = np.arange(len(ents))
        groups: dict[tuple, list[int]] = {}
        for i in rest.tolist():
            groups.setdefault(tuple(ents[i]), []).append(i)
        out = [(k, np.asarray(v, dtype=np.int64), None) for k, v in groups.items()]
        if len(rest) < len(ents):
            out.append((top, np.flatnonzero(same), sel))
        out.sort(key=lambda g: int(g[1][0]))
        return out

    def _block(self, sub, cols: list[str], n: int, every_key: bool) -> np.ndarray | None:
        """The group's values as one float64 block [entries, cols] in one numpy call, when every one is a number
        (int, float, bool) and no integer is out of range; None otherwise. ``every_key``: ``cols`` are all the
        keys of every entry, in their order, so the values are taken as one flat list of the entries' values
        (half the time of a list of tuples: numpy discovers no nested shape); the same dtype either way."""
        try:
            if every_key:
                block = np.array(list(chain.from_iterable(map(dict.values, sub))))
            else:
                block = np.array(list(map(operator.itemgetter(*cols), sub)))
        except (ValueError, TypeError, OverflowError):
            return None
        if block.dtype.kind not in "fiub":
            return None
        if every_key:
            if block.shape != (n * len(cols),):
                return None
            block = block.reshape(n, len(cols))
        block = block.reshape(n, -1) if len(cols) == 1 and block.ndim == 1 else block
        if block.shape != (n, len(cols)):
            return None
        f = block.astype(np.float64)
        if block.dtype.kind == "f" and bool((np.abs(f) >= 1e29).any()):
            return None  # a float column may hold a converted integer out of range: value by value
        return f

    def add(self, history: list) -> None:
        """One piece of log_history (the entries after the pieces added before)."""
        n = len(history)
        if not n:
            return
        where = None  # piece index of each dict entry when some entries are not dicts
        ents = history
        if set(map(type, history)) != {dict}:
            where = np.asarray([j for j, e in enumerate(history) if isinstance(e, dict)], dtype=np.int64)
            for e in history:
                if not isinstance(e, dict):
                    self.res.non_numeric += 1
                    if self.fast and _too_deep(e, 3):
                        raise _TooDeep
            ents = [history[j] for j in where.tolist()]
        steps = np.zeros(n, dtype=np.int64)
        has = np.zeros(n, dtype=bool)
        cnt = np.zeros(n, dtype=np.int64)
        blocks = []
        for keys, idx, sel in (self._groups(ents) if ents else []):
            eidx = idx if where is None else where[idx]
            g0 = self.first.setdefault(keys, self.n + int(eidx[0]))
            sub = ents if len(idx) == len(ents) else (compress(ents, sel) if sel is not None
                                                      else [ents[i] for i in idx.tolist()])
            long = [k for k in keys if len(k) > limits.MAX_NAME_CHARS]
            cols = [k for k in keys if len(k) <= limits.MAX_NAME_CHARS]
            keys = [k for k in cols if k != "step"]
            block = self._block(sub, cols, len(idx), not long) if len(idx) >= _SMALL_GROUP and cols else None
            if block is not None and "step" in cols:
                sv = block[:, cols.index("step")]
                if bool((np.abs(sv) <= limits.MAX_STEP).all()):  # (NaN compares false)
                    steps[eidx], has[eidx] = sv.astype(np.int64), True
                else:
                    block = None
            if block is None and not isinstance(sub, list):
                sub = [ents[i] for i in idx.tolist()]
            if long:
                self.res.long_keys += len(long) * len(idx)
                if self.fast and any(_too_deep(e[k], 4) for e in sub for k in long):
                    raise _TooDeep
            if block is None and "step" in cols:
                steps[eidx], ok = self._step_column(list(map(operator.itemgetter("step"), sub)), eidx)
                has[eidx] = True if ok is None else ok
            if not keys:
                continue
            present = None
            if block is not None:
                vals = block[:, [c for c, k in enumerate(cols) if k != "step"]] if "step" in cols else block
            else:
                vals = np.empty((len(idx), len(keys)))
                for c, k in enumerate(keys):
                    vals[:, c], pc = self._column(list(map(operator.itemgetter(k), sub)), k, g0, eidx, c)
                    if pc is not None:
                        if present is None:
                            present = np.ones(vals.shape, dtype=bool)
                        present[:, c] = pc
            codes = np.array([self.codes.setdefault(KEY_ALIASES.get(k, k), len(self.codes)) for k in keys],
                             dtype=np.int32)
            cnt[eidx] = len(keys) if present is None else present.sum(axis=1)
            self.used.update((codes if present is None else codes[present.any(axis=0)]).tolist())
            blocks.append((eidx, vals, present, codes))
        n_dicts = n if where is None else len(where)
        self.res.info.entries_without_step += int(n_dicts - (has.sum() if where is None else has[where].sum()))
        self._place(self._fill_steps(steps, has), cnt, blocks)
        self.n += n

    def _place(self, steps: np.ndarray, cnt: np.ndarray, blocks: list) -> None:
        """The points of one piece in entry order, keys in their order within an entry. When every value of every
        group is present, the groups' runs of consecutive entries are concatenated in entry order (a training log
        is runs of train entries between eval entries); otherwise each point goes to the running count of the
        points of the entries before it."""
        if not blocks:
            return
        if all(b[2] is None for b in blocks):
            runs = []
            for eidx, vals, _p, codes in blocks:
                cut = np.flatnonzero(np.diff(eidx) != 1) + 1
                lo = np.concatenate(([0], cut))
                hi = np.concatenate((cut, [len(eidx)]))
                runs.extend((int(eidx[i]), i, j, vals, codes) for i, j in zip(lo.tolist(), hi.tolist()))
            runs.sort(key=operator.itemgetter(0))
            nks = [v.shape[1] for _e, _i, _j, v, _c in runs]
            self.parts.append((
                np.repeat(steps[np.concatenate([np.arange(e, e + j - i) for e, i, j, _v, _c in runs])],
                          np.repeat(nks, [j - i for _e, i, j, _v, _c in runs])),
                np.concatenate([np.tile(c, j - i) for _e, i, j, _v, c in runs]),
                np.concatenate([v[i:j].ravel() for _e, i, j, v, _c in runs])))
            return
        total = int(cnt.sum())
        start = np.cumsum(cnt) - cnt
        out_s = np.empty(total, dtype=np.int64)
        out_c = np.empty(total, dtype=np.int32)
        out_v = np.empty(total, dtype=np.float64)
        for eidx, vals, present, codes in blocks:
            shape = vals.shape
            present = np.ones(shape, dtype=bool) if present is None else present
            pos = (start[eidx][:, None] + np.cumsum(present, axis=1) - 1)[present]
            out_s[pos] = np.broadcast_to(steps[eidx][:, None], shape)[present]
            out_c[pos] = np.broadcast_to(codes[None, :], shape)[present]
            out_v[pos] = vals[present]
        self.parts.append((out_s, out_c, out_v))

    def finish(self) -> None:
        res = self.res
        res.n_out_of_range += self.n_range
        for _key, what in sorted(self.examples):
            if len(res.out_of_range) >= 3:
                break
            res.out_of_range.append(what)
        parts = [p for p in self.parts if len(p[0])]
        if not parts:
            return
        res.steps, codes, res.values = ([p[k] for p in parts][0] if len(parts) == 1 else
                                        np.concatenate([p[k] for p in parts]) for k in range(3))
        res.metric_codes, res.metric_names = codes, list(self.codes)
        res.metric_used = np.asarray(sorted(self.used), dtype=np.int64)


