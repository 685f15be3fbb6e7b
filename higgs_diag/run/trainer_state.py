"""Reading ``trainer_state.json`` (HF Trainer) into scalar columns, tolerating what users really have:
``NaN``/``Infinity`` literals, entries without ``step``, numbers stored as strings, ``lr`` for
``learning_rate``, several eval sets at one step, Git LFS pointers, cut-off files and JSON that is not
a Trainer state at all."""
from __future__ import annotations

import json
import math
import re

import numpy as np
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .. import limits
from .model import ReadProblem, TrainerStateInfo
from .state_columns import KEY_ALIASES, is_out_of_range  # noqa: F401 (also what other readers import from here)
from .state_columns import (NOT_FAST, _bounded, _Flat, _OutOfRange, _show, _to_float, _to_int, _too_deep, _TooDeep,
                            fast_loads)

# transformers sets num_train_epochs = sys.maxsize when max_steps is given and the dataset has no length
HF_EPOCHS_UNKNOWN = 2 ** 63 - 1

LFS_PREFIX = "version https://git-lfs.github.com/spec/"
_INT_FIELDS = ("global_step", "max_steps", "logging_steps", "eval_steps", "save_steps", "train_batch_size")


# ------------------------------------------------------------------------------------------------------------
# Bounded JSON: nesting, integer literals (higgs_diag.limits)
# ------------------------------------------------------------------------------------------------------------
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


@dataclass
class StateResult:
    info: TrainerStateInfo | None
    # long columns in entry order (numpy arrays once read; lists when empty); the metric of each point is
    # metric_codes into metric_names (``metrics`` gives the names)
    steps: "np.ndarray | list" = field(default_factory=list)
    values: "np.ndarray | list" = field(default_factory=list)
    problems: list[ReadProblem] = field(default_factory=list)
    non_numeric: int = 0  # values that were neither numbers nor numeric strings (kept out of the scalars)
    out_of_range: list[str] = field(default_factory=list)  # what was out of the limits (a few examples)
    n_out_of_range: int = 0
    long_keys: int = 0  # log_history keys longer than limits.MAX_NAME_CHARS (their values are left out)
    metric_codes: "np.ndarray | None" = None  # metrics as int32 codes into metric_names (what load_run uses)
    metric_names: list[str] = field(default_factory=list)
    metric_used: "np.ndarray | None" = None  # the codes that have points, ascending (None: counted when needed)

    @cached_property
    def metrics(self) -> "np.ndarray | list":
        """The metric name of every point, in entry order (an object array, made from the codes when first asked
        for: load_run reads the codes through :meth:`metric_categorical` and never builds it)."""
        if self.metric_codes is None:
            return []
        names = np.empty(len(self.metric_names), dtype=object)
        names[:] = self.metric_names
        return names[self.metric_codes]

    def metric_categorical(self):
        """``metrics`` as a pandas Categorical (categories sorted, as ``pd.Categorical(metrics)`` gives them),
        built from the codes without hashing every name."""
        import pandas as pd

        if self.metric_codes is None:
            return pd.Categorical(np.asarray(self.metrics, dtype=object))
        names = np.asarray(self.metric_names, dtype=object)
        used = (self.metric_used if self.metric_used is not None
                else np.flatnonzero(np.bincount(self.metric_codes, minlength=len(names))))
        order = used[np.argsort(names[used].astype(str), kind="stable")]
        remap = np.full(len(names), -1, dtype=np.int32)
        remap[order] = np.arange(len(order), dtype=np.int32)
        return pd.Categorical.from_codes(remap[self.metric_codes], categories=pd.Index(list(names[order]), dtype=object))

    def range_problem(self, what: str) -> None:
        self.n_out_of_range += 1
        if len(self.out_of_range) < 3:
            self.out_of_range.append(what)


def _int_field(v, key: str, res: "StateResult") -> int | None:
    """:func:`_to_int`, and a number that is there but out of range is recorded."""
    i = _to_int(v)
    if i is None and v is not None and (is_out_of_range(v) or _to_float(v) is not None):
        res.range_problem(f"{key} {_show(v)}")
    return i


def read_trainer_state(path: str | Path, *, chunk_bytes: int | None = None, stream_above: int | None = None,
                       whole_limit: int | None = None) -> StateResult:
    """One trainer_state.json. A file of at most ``stream_above`` bytes (``limits.STATE_STREAM_ABOVE_BYTES``) is
    parsed whole; a larger one in pieces of about ``chunk_bytes`` (``limits.STATE_CHUNK_BYTES``) of log_history,
    so memory grows with the points kept (``state_stream``). A large file whose structure is not a plain state
    (damaged, cut off) is parsed whole when it has at most ``whole_limit`` bytes
    (``limits.MAX_STATE_WHOLE_PARSE_BYTES``), so its problems read as a small file's."""
    p = Path(path)
    name = str(p)
    refusal = getattr(path, "refusal", None)  # a path discover would not read (see discover.Refused)
    if refusal is not None:
        return StateResult(None, problems=[refusal])
    stream_above = limits.STATE_STREAM_ABOVE_BYTES if stream_above is None else stream_above
    whole_limit = limits.MAX_STATE_WHOLE_PARSE_BYTES if whole_limit is None else whole_limit
    try:
        fh, size = limits.open_regular(p, limits.MAX_STATE_FILE_BYTES, "trainer_state.json")
        with fh:
            if size > stream_above:
                from .state_stream import read_streaming

                res = read_streaming(fh, name, chunk_bytes or limits.STATE_CHUNK_BYTES, size <= whole_limit)
                if res is not None:
                    return res
                fh.seek(0)
            raw = _read_all(fh, size, max(whole_limit, stream_above))
    except limits.NotReadable as e:
        return StateResult(None, problems=[ReadProblem(name, str(e), kind="unreadable", fatal=True)])
    except OSError as e:
        return StateResult(None, problems=[ReadProblem(name, f"cannot read: {e.strerror or e}", fatal=True)])
    return _read_whole(raw, name)


def _read_all(fh, size: int, limit: int) -> bytes:
    """The file in one read when it holds the size fstat gave (no join copy; ``size`` is at most the streaming
    threshold here), else in bounded pieces up to ``limit`` (a file that grows or shrinks while read)."""
    first = fh.read(size + 1) if size < limit else b""
    if len(first) == size:
        return first
    parts, total = [first], len(first)
    while True:
        chunk = fh.read(min(limits.READ_CHUNK_BYTES, limit + 1 - total))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
        if total > limit:
            raise limits.NotReadable(f"more than {limit:,} bytes (the limit for a trainer_state.json, "
                                     f"higgs_diag.limits): not read")


_BOM = b"\xef\xbb\xbf"


def _fast_result(raw: bytes, name: str) -> StateResult | None:
    """The fast parser's reading of ``raw``; None when it refuses the bytes, or when they nest over the limit (the
    exact path then says where)."""
    data = fast_loads(raw)
    if data is NOT_FAST:
        return None
    try:
        return state_result(data, name, [], fast=True)
    except _TooDeep:
        return None


def _read_whole(raw: bytes, name: str) -> StateResult:
    if not raw[:64].strip() and not raw.strip():
        return StateResult(None, problems=[ReadProblem(name, "empty file", kind="empty", fatal=True)])
    tried = not raw.startswith(_BOM)
    if tried:  # first the fast parser: JSON it reads is UTF-8 text (it checks) and no Git LFS pointer
        fast = _fast_result(raw, name)
        if fast is not None:
            return fast
    text = None
    if not raw.isascii():
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return StateResult(None, problems=[ReadProblem(name, f"not UTF-8 text (byte {e.start})", offset=e.start,
                                                           kind="unreadable", fatal=True)])
    if raw.startswith(_LFS) or (text is not None and text.startswith(LFS_PREFIX)):
        text = raw.decode("utf-8-sig") if text is None else text
        size = re.search(r"^size (\d{1,20})", text, re.M)
        what = f" of a {size.group(1)}-byte file" if size else ""
        return StateResult(None, problems=[ReadProblem(
            name, f"a Git LFS pointer{what}, not JSON: run `git lfs pull` to fetch the real file",
            kind="lfs-pointer", fatal=True)])
    if raw.startswith(_BOM):
        raw = raw[3:]
    if not tried:
        fast = _fast_result(raw, name)
        if fast is not None:
            return fast
    text = raw.decode("ascii") if text is None else text
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
        problems.append(salvage_problem(name, e, salvaged))
    return state_result(data, name, problems, fast=False)


_LFS = LFS_PREFIX.encode()


def salvage_problem(name: str, e, salvaged: int) -> ReadProblem:
    """The problem of a file whose entries before the damage at ``e.pos`` (a character offset) were used."""
    what = (f"cut off or corrupt JSON ({e.msg} at byte {e.pos})" if isinstance(e, json.JSONDecodeError)
            else f"JSON {e.msg}")
    return ReadProblem(name, f"{what}; the {salvaged} log_history entries before it were used", offset=e.pos,
                       kind="truncated")


def state_result(data, name: str, problems: list[ReadProblem], fast: bool) -> StateResult:
    """The result of a state parsed whole (``fast``: by :func:`fast_loads`; may raise :class:`_TooDeep`)."""
    if not isinstance(data, dict) or ("log_history" not in data and "global_step" not in data):
        what = type(data).__name__ if not isinstance(data, dict) else "an object without log_history/global_step"
        if is_out_of_range(_bounded(data)):
            what = "a number"
        if fast and _too_deep(data, 1):
            raise _TooDeep
        return StateResult(None, problems=problems + [ReadProblem(
            name, f"not a HF Trainer state ({what})", kind="not-trainer-state", fatal=True)])
    history = data.get("log_history")
    if fast and any(_too_deep(v, 2) for k, v in data.items() if not (k == "log_history" and isinstance(v, list))):
        raise _TooDeep
    res = StateResult(TrainerStateInfo(path=name), problems=problems)
    flat = _Flat(res, fast)
    state_fields(data, res)
    if not isinstance(history, list):
        if history is not None:
            res.problems.append(ReadProblem(name, "log_history is not a list", kind="unreadable"))
        history = []
    flat.add(history)
    finish_state(res, flat, len(history))
    return res


def state_fields(data: dict, res: StateResult) -> None:
    """The scalar fields of a state (out-of-range values recorded, before the log_history's)."""
    info = res.info
    for key in _INT_FIELDS:
        setattr(info, key, _int_field(_bounded(data.get(key)), key, res))
    nte = _to_float(_bounded(data.get("num_train_epochs")))
    if nte == float(HF_EPOCHS_UNKNOWN):
        nte = None  # HF's own sentinel (max_steps with a dataset of unknown length), not damage
    if nte is not None and not (math.isfinite(nte) and abs(nte) <= limits.MAX_STEP):
        res.range_problem(f"num_train_epochs {_show(nte)}")
        nte = None
    info.num_train_epochs = nte
    info.best_metric = _best_metric(_bounded(data.get("best_metric")), res)
    bmc = data.get("best_model_checkpoint")
    if isinstance(bmc, str) and len(bmc) > limits.MAX_NAME_CHARS:
        res.range_problem(f"best_model_checkpoint ({len(bmc):,} characters)")
        bmc = None
    info.best_model_checkpoint = bmc if isinstance(bmc, str) else None
    hps = data.get("is_hyper_param_search")
    info.is_hyper_param_search = hps if isinstance(hps, bool) else None


def finish_state(res: StateResult, flat: "_Flat", n_entries: int) -> None:
    """The columns and the problems that sum up the log_history (after every piece was added)."""
    name = res.info.path
    if not n_entries:
        res.problems.append(ReadProblem(name, "empty log_history: nothing was logged before this state was saved",
                                        kind="empty"))
    flat.finish()
    res.info.n_entries = n_entries
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


_GAP = re.compile(r"[ \t\r\n,]*")


def _salvage(text: str, end: int | None = None):
    """Parse the log_history entries of a cut-off file one by one, up to character ``end`` (where the damage
    is); returns (data, n_entries) or (None, 0)."""
    m = re.search(r'"log_history"\s*:\s*\[', text)
    if not m:
        return None, 0
    n = len(text) if end is None else min(end, len(text))
    entries = salvage_entries(text[:n], m.end())
    data: dict = {"log_history": entries}
    data.update(salvage_fields(text))
    return data, len(entries)


def salvage_entries(part: str, pos: int) -> list:
    """The complete log_history entries of ``part`` from character ``pos`` on, one by one until one fails."""
    dec = bounded_decoder()
    entries = []
    while pos < len(part):
        pos = _GAP.match(part, pos).end()
        if pos >= len(part) or part[pos] == "]":
            break
        try:
            obj, pos = dec.raw_decode(part, pos)
        except (json.JSONDecodeError, RecursionError):
            break
        entries.append(obj)
    return entries


SALVAGED_FIELDS = _INT_FIELDS + ("best_metric", "best_model_checkpoint", "num_train_epochs")


def field_pattern(key: str) -> str:
    return rf'"{key}"\s*:\s*("(?:[^"\\]|\\.)*"|[-0-9.eE+]+|null|NaN|Infinity)'


def salvage_fields(text: str, keys=SALVAGED_FIELDS) -> dict:
    """The fields of a damaged file: the first ``"key": value`` of each anywhere in ``text``."""
    dec = bounded_decoder()
    data = {}
    for key in keys:
        mm = re.search(field_pattern(key), text)
        if mm:
            try:
                data[key] = dec.decode(mm.group(1))
            except ValueError:  # JSONDecodeError, and numbers Python will not convert
                pass
    return data
