"""The state-file reader as it was before the fast and chunked paths (commit 67a5150), kept verbatim as the
reference the new reader must match bit for bit (tests/test_trainer_state_fast.py).

Reading ``trainer_state.json`` (HF Trainer) into scalar columns, tolerating what users really have:
``NaN``/``Infinity`` literals, entries without ``step``, numbers stored as strings, ``lr`` for
``learning_rate``, several eval sets at one step, Git LFS pointers, cut-off files and JSON that is not
a Trainer state at all."""
from __future__ import annotations

import json
import math
import operator
import re

import numpy as np
from dataclasses import dataclass, field
from pathlib import Path

from higgs_diag import limits
from higgs_diag.run.model import ReadProblem, TrainerStateInfo

# transformers sets num_train_epochs = sys.maxsize when max_steps is given and the dataset has no length
HF_EPOCHS_UNKNOWN = 2 ** 63 - 1

LFS_PREFIX = "version https://git-lfs.github.com/spec/"
# Canonical names for keys some trainers log under another name.
KEY_ALIASES = {"lr": "learning_rate", "train/loss": "loss", "eval/loss": "eval_loss"}
_INT_FIELDS = ("global_step", "max_steps", "logging_steps", "eval_steps", "save_steps", "train_batch_size")


# ------------------------------------------------------------------------------------------------------------
# Bounded JSON: nesting, integer literals (higgs_diag.limits)
# ------------------------------------------------------------------------------------------------------------
class _OutOfRange:
    """An integer literal with more than ``limits.MAX_INT_DIGITS`` digits: never converted to int."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a {self.digits}-digit integer>"


def _parse_int(s: str):
    return int(s) if len(s) <= limits.MAX_INT_DIGITS else _OutOfRange(len(s))


class JSONLimitError(ValueError):
    """JSON outside the limits of ``higgs_diag.limits`` (too deep); ``pos`` is the character offset."""

    def __init__(self, msg: str, pos: int):
        super().__init__(msg)
        self.msg, self.pos = msg, pos


_SPECIAL = np.zeros(256, dtype=bool)
_SPECIAL[list(b'"\\[]{}')] = True
_DELTA = np.zeros(256, dtype=np.int64)
_DELTA[list(b"[{")] = 1
_DELTA[list(b"]}")] = -1


_ESCAPE = re.compile(rb"\\.", re.S)
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))


def too_deep_at(raw: bytes, limit: int = limits.MAX_JSON_DEPTH, chunk: int = 1 << 24) -> int | None:
    """The byte offset of the first bracket that nests the JSON text ``raw`` deeper than ``limit`` (brackets in
    strings do not count; a backslash escapes the byte after it), or None. Linear: escapes removed by one regex
    pass, then only quotes and brackets are kept (``bytes.translate``) and counted with numpy, chunk by chunk;
    the offset is found by :func:`_deep_offset` only when the limit is exceeded."""
    text = _ESCAPE.sub(b"", raw) if b"\\" in raw else raw
    in_str, depth = 0, 0
    for c0 in range(0, len(text), chunk):
        s = np.frombuffer(text[c0:c0 + chunk].translate(None, _NOT_STRUCTURE), dtype=np.uint8)
        if s.size == 0:
            continue
        q = (s == 0x22).astype(np.int64)
        toggles = np.cumsum(q)
        inside = ((toggles - q + in_str) & 1).astype(bool)
        cum = depth + np.cumsum(np.where(inside, 0, _DELTA[s]))
        if int(cum.max()) > limit:
            return _deep_offset(raw, limit)
        depth = int(cum[-1])
        in_str = (in_str + int(toggles[-1])) & 1
    return None


def _deep_offset(raw: bytes, limit: int, chunk: int = 1 << 22) -> int | None:
    """:func:`too_deep_at`, keeping the position of every quote, backslash and bracket (slower)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    in_str, depth, bs_run = False, 0, 0  # bs_run: backslashes ending the previous chunk
    for c0 in range(0, a.size, chunk):
        seg = a[c0:c0 + chunk]
        pos = np.flatnonzero(_SPECIAL[seg])
        if pos.size == 0:
            bs_run = 0
            continue
        ch = seg[pos]
        bs = ch == 0x5C
        contig = np.empty(pos.size, dtype=bool)  # a backslash right before this byte
        contig[0] = pos[0] == 0 and bs_run > 0
        contig[1:] = bs[:-1] & (pos[1:] == pos[:-1] + 1)
        idx = np.arange(pos.size)
        brk = np.maximum.accumulate(np.where(contig, -1, idx))
        run = np.where(brk < 0, idx + bs_run, idx - brk)  # backslashes right before each special byte
        quote = (ch == 0x22) & (run % 2 == 0)
        toggles = np.cumsum(quote)
        inside = ((toggles - quote) % 2 == 1) ^ in_str
        cum = depth + np.cumsum(np.where(inside | (run % 2 == 1), 0, _DELTA[ch]))
        over = np.flatnonzero(cum > limit)
        if over.size:
            return c0 + int(pos[over[0]])
        depth = int(cum[-1])
        in_str = bool(inside[-1]) ^ bool(quote[-1])
        bs_run = int(run[-1]) + 1 if bs[-1] and pos[-1] == seg.size - 1 else 0
    return None


def bounded_decoder() -> json.JSONDecoder:
    """A decoder whose integer literals longer than ``limits.MAX_INT_DIGITS`` come back as out-of-range markers
    (Python refuses more than 4,300 digits with ValueError; large ones overflow every conversion after)."""
    return json.JSONDecoder(parse_int=_parse_int)


def loads_bounded(text: str, raw: bytes | None = None):
    """``json.loads`` within the limits: nesting deeper than ``limits.MAX_JSON_DEPTH`` raises
    :class:`JSONLimitError` before parsing; long integers become out-of-range markers (:func:`is_out_of_range`).
    Raises ``json.JSONDecodeError`` for invalid JSON."""
    raw = text.encode("utf-8", "surrogatepass") if raw is None else raw
    at = too_deep_at(raw)
    if at is not None:
        pos = len(raw[:at].decode("utf-8", "replace"))
        raise JSONLimitError(f"nested deeper than {limits.MAX_JSON_DEPTH} levels (higgs_diag.limits.MAX_JSON_DEPTH)",
                             pos)
    try:
        return bounded_decoder().decode(text)
    except RecursionError:  # cannot happen below MAX_JSON_DEPTH; kept as a net
        raise JSONLimitError("nested too deeply for the JSON parser", 0) from None


def is_out_of_range(v) -> bool:
    return isinstance(v, _OutOfRange)


@dataclass
class StateResult:
    info: TrainerStateInfo | None
    # long columns in entry order (numpy arrays once read; lists when empty)
    steps: "np.ndarray | list" = field(default_factory=list)
    metrics: "np.ndarray | list" = field(default_factory=list)
    values: "np.ndarray | list" = field(default_factory=list)
    problems: list[ReadProblem] = field(default_factory=list)
    non_numeric: int = 0  # values that were neither numbers nor numeric strings (kept out of the scalars)
    out_of_range: list[str] = field(default_factory=list)  # what was out of the limits (a few examples)
    n_out_of_range: int = 0
    long_keys: int = 0  # log_history keys longer than limits.MAX_NAME_CHARS (their values are left out)

    def range_problem(self, what: str) -> None:
        self.n_out_of_range += 1
        if len(self.out_of_range) < 3:
            self.out_of_range.append(what)


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


def _int_field(v, key: str, res: "StateResult") -> int | None:
    """:func:`_to_int`, and a number that is there but out of range is recorded."""
    i = _to_int(v)
    if i is None and v is not None and (is_out_of_range(v) or _to_float(v) is not None):
        res.range_problem(f"{key} {_show(v)}")
    return i


def _show(v) -> str:
    if is_out_of_range(v):
        return repr(v)
    f = _to_float(v)
    if f is not None:
        return f"{f:g}"
    return type(v).__name__


def read_trainer_state(path: str | Path) -> StateResult:
    p = Path(path)
    name = str(p)
    refusal = getattr(path, "refusal", None)  # a path discover would not read (see discover.Refused)
    if refusal is not None:
        return StateResult(None, problems=[refusal])
    try:
        fh, _size = limits.open_regular(p, limits.MAX_STATE_FILE_BYTES, "trainer_state.json")
        with fh:
            raw = limits.read_bounded(fh, limits.MAX_STATE_FILE_BYTES, "trainer_state.json")
    except limits.NotReadable as e:
        return StateResult(None, problems=[ReadProblem(name, str(e), kind="unreadable", fatal=True)])
    except OSError as e:
        return StateResult(None, problems=[ReadProblem(name, f"cannot read: {e.strerror or e}", fatal=True)])
    if not raw.strip():
        return StateResult(None, problems=[ReadProblem(name, "empty file", kind="empty", fatal=True)])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return StateResult(None, problems=[ReadProblem(name, f"not UTF-8 text (byte {e.start})", offset=e.start,
                                                       kind="unreadable", fatal=True)])
    if text.startswith(LFS_PREFIX):
        size = re.search(r"^size (\d{1,20})", text, re.M)
        what = f" of a {size.group(1)}-byte file" if size else ""
        return StateResult(None, problems=[ReadProblem(
            name, f"a Git LFS pointer{what}, not JSON: run `git lfs pull` to fetch the real file",
            kind="lfs-pointer", fatal=True)])
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    problems: list[ReadProblem] = []
    try:
        data = loads_bounded(text, raw)
    except (json.JSONDecodeError, JSONLimitError) as e:
        data, salvaged = _salvage(text, e.pos)
        if data is None:
            why = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else e.msg
            return StateResult(None, problems=[ReadProblem(
                name, f"not valid JSON ({why})" if isinstance(e, json.JSONDecodeError) else f"not read: {why}",
                offset=e.pos, kind="unreadable", fatal=True)])
        what = (f"cut off or corrupt JSON ({e.msg} at byte {e.pos})" if isinstance(e, json.JSONDecodeError)
                else f"JSON {e.msg}")
        problems.append(ReadProblem(
            name, f"{what}; the {salvaged} log_history entries before it were used", offset=e.pos, kind="truncated"))
    if not isinstance(data, dict) or ("log_history" not in data and "global_step" not in data):
        what = type(data).__name__ if not isinstance(data, dict) else "an object without log_history/global_step"
        if is_out_of_range(data):
            what = "a number"
        return StateResult(None, problems=problems + [ReadProblem(
            name, f"not a HF Trainer state ({what})", kind="not-trainer-state", fatal=True)])

    info = TrainerStateInfo(path=name)
    res = StateResult(info, problems=problems)
    for key in _INT_FIELDS:
        setattr(info, key, _int_field(data.get(key), key, res))
    nte = _to_float(data.get("num_train_epochs"))
    if nte == float(HF_EPOCHS_UNKNOWN):
        nte = None  # HF's own sentinel (max_steps with a dataset of unknown length), not damage
    if nte is not None and not (math.isfinite(nte) and abs(nte) <= limits.MAX_STEP):
        res.range_problem(f"num_train_epochs {_show(nte)}")
        nte = None
    info.num_train_epochs = nte
    info.best_metric = _best_metric(data.get("best_metric"), res)
    bmc = data.get("best_model_checkpoint")
    if isinstance(bmc, str) and len(bmc) > limits.MAX_NAME_CHARS:
        res.range_problem(f"best_model_checkpoint ({len(bmc):,} characters)")
        bmc = None
    info.best_model_checkpoint = bmc if isinstance(bmc, str) else None
    hps = data.get("is_hyper_param_search")
    info.is_hyper_param_search = hps if isinstance(hps, bool) else None

    history = data.get("log_history")
    if not isinstance(history, list):
        if history is not None:
            res.problems.append(ReadProblem(name, "log_history is not a list", kind="unreadable"))
        history = []
    if not history:
        res.problems.append(ReadProblem(name, "empty log_history: nothing was logged before this state was saved",
                                        kind="empty"))
    _flatten(history, res)
    info.n_entries = len(history)
    if res.non_numeric:  # nothing readable is dropped silently: say what was left out of the scalars
        res.problems.append(ReadProblem(
            name, f"{res.non_numeric} log_history value(s) are neither numbers nor numeric strings (text, lists, "
                  f"null or nested objects) and are not scalar points", kind="non-numeric"))
    if res.long_keys:
        res.problems.append(ReadProblem(
            name, f"{res.long_keys} log_history key(s) longer than {limits.MAX_NAME_CHARS} characters "
                  f"(higgs_diag.limits.MAX_NAME_CHARS): their values were left out", kind="out-of-range"))
    if res.n_out_of_range:
        res.problems.append(ReadProblem(
            name, f"{res.n_out_of_range} value(s) out of range ({', '.join(res.out_of_range)}"
                  f"{', ...' if res.n_out_of_range > len(res.out_of_range) else ''}; limits in higgs_diag.limits): "
                  f"left out", kind="out-of-range"))
    return res


def _best_metric(v, res: StateResult) -> float | None:
    """best_metric as a float (HF writes a float or null); a number out of range is recorded."""
    if v is None or isinstance(v, bool):
        return None
    f = _to_float(v) if isinstance(v, (int, float)) or is_out_of_range(v) else None
    if f is None:
        if is_out_of_range(v) or isinstance(v, int):
            res.range_problem(f"best_metric {_show(v)}")
        return None
    return f


def _entry_steps(history: list, res: StateResult) -> list[int]:
    """The step of every entry; an entry without one (e.g. predict_* results appended after training), or with
    one out of range (recorded), is attached to the step of the entry before it."""
    info = res.info
    steps = []
    last = 0
    for entry in history:
        st = _int_field(entry.get("step"), "step", res) if isinstance(entry, dict) else None
        if st is None:
            if isinstance(entry, dict):
                info.entries_without_step += 1
            st = last
        else:
            last = st
        steps.append(st)
    return steps


_SMALL_GROUP = 8  # key groups with fewer entries are converted value by value


def _value(v, key: str, res: StateResult) -> float | None:
    """One log_history value as float; None (counted as non-numeric or out of range) when it is not a number."""
    f = _to_float(v)
    if f is None:
        if is_out_of_range(v) or isinstance(v, int):
            res.range_problem(f"{key} {_show(v)}")
        else:
            res.non_numeric += 1
    return f


def _flatten(history: list, res: StateResult) -> None:
    """log_history -> long columns in entry order. Entries are grouped by their key tuple (a 143k-step
    history has a handful of distinct ones) so that each group converts to floats in one numpy call;
    a group holding strings or nulls falls back to converting value by value."""
    entry_steps = _entry_steps(history, res)
    groups: dict[tuple, list[int]] = {}
    for i, entry in enumerate(history):
        if isinstance(entry, dict):
            groups.setdefault(tuple(entry), []).append(i)
        else:
            res.non_numeric += 1
    order_parts, step_parts, metric_parts, value_parts = [], [], [], []
    width = max((len(k) for k in groups), default=1) + 1  # entry index * width + key position = entry order
    small: tuple[list, list, list, list] = ([], [], [], [])  # groups of a few entries: value by value
    for keys, idx in groups.items():
        keys = tuple(k for k in keys if k != "step")
        if any(len(k) > limits.MAX_NAME_CHARS for k in keys):
            res.long_keys += sum(len(k) > limits.MAX_NAME_CHARS for k in keys) * len(idx)
            keys = tuple(k for k in keys if len(k) <= limits.MAX_NAME_CHARS)
        if not keys:
            continue
        if len(idx) < _SMALL_GROUP:  # per-group numpy calls would cost more than they save (linear either way)
            for i in idx:
                entry = history[i]
                for c, k in enumerate(keys):
                    f = _value(entry[k], k, res)
                    if f is not None:
                        small[0].append(i * width + c)
                        small[1].append(entry_steps[i])
                        small[2].append(KEY_ALIASES.get(k, k))
                        small[3].append(f)
            continue
        entries = [history[i] for i in idx]
        getter = operator.itemgetter(*keys)
        rows = list(map(getter, entries)) if len(keys) > 1 else [(v,) for v in map(getter, entries)]
        try:
            block = np.array(rows, dtype="float64")  # fails on strings/None/nested values
            if block.shape != (len(idx), len(keys)):
                raise ValueError
            present = np.ones(block.shape, dtype=bool)
        except (TypeError, ValueError):
            block = np.full((len(idx), len(keys)), np.nan)
            present = np.zeros(block.shape, dtype=bool)
            for r, row in enumerate(rows):
                for c, v in enumerate(row):
                    f = _value(v, keys[c], res)
                    if f is not None:
                        block[r, c] = f
                        present[r, c] = True
        n_k = len(keys)
        idx_arr = np.asarray(idx, dtype=np.int64)
        order_parts.append((idx_arr[:, None] * width + np.arange(n_k)[None, :])[present])
        step_parts.append(np.repeat(np.asarray([entry_steps[i] for i in idx], dtype=np.int64), n_k)
                          .reshape(len(idx), n_k)[present])
        names = np.array([KEY_ALIASES.get(k, k) for k in keys], dtype=object)
        metric_parts.append(np.broadcast_to(names, block.shape)[present])
        value_parts.append(block[present])
    if small[0]:
        order_parts.append(np.asarray(small[0], dtype=np.int64))
        step_parts.append(np.asarray(small[1], dtype=np.int64))
        names = np.empty(len(small[2]), dtype=object)
        names[:] = small[2]
        metric_parts.append(names)
        value_parts.append(np.asarray(small[3], dtype=np.float64))
    if not order_parts:
        return
    order = np.concatenate(order_parts)
    perm = np.argsort(order, kind="stable")  # back to entry order, keys in their order within an entry
    res.steps = np.concatenate(step_parts)[perm]
    res.metrics = np.concatenate(metric_parts)[perm]
    res.values = np.concatenate(value_parts)[perm]


_GAP = re.compile(r"[ \t\r\n,]*")


def _salvage(text: str, end: int | None = None):
    """Parse the log_history entries of a cut-off file one by one, up to character ``end`` (where the damage
    is); returns (data, n_entries) or (None, 0)."""
    m = re.search(r'"log_history"\s*:\s*\[', text)
    if not m:
        return None, 0
    dec = bounded_decoder()
    pos = m.end()
    entries = []
    n = len(text) if end is None else min(end, len(text))
    part = text[:n]
    while pos < n:
        pos = _GAP.match(part, pos).end()
        if pos >= n or part[pos] == "]":
            break
        try:
            obj, pos = dec.raw_decode(part, pos)
        except (json.JSONDecodeError, RecursionError):
            break
        entries.append(obj)
    data: dict = {"log_history": entries}
    for key in _INT_FIELDS + ("best_metric", "best_model_checkpoint", "num_train_epochs"):
        mm = re.search(rf'"{key}"\s*:\s*("(?:[^"\\]|\\.)*"|[-0-9.eE+]+|null|NaN|Infinity)', text)
        if mm:
            try:
                data[key] = dec.decode(mm.group(1))
            except ValueError:  # JSONDecodeError, and numbers Python will not convert
                pass
    return data, len(entries)
