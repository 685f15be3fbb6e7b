"""Reading ``trainer_state.json`` (HF Trainer) into scalar columns, tolerating what users really have:
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

from .model import ReadProblem, TrainerStateInfo

LFS_PREFIX = "version https://git-lfs.github.com/spec/"
# Canonical names for keys some trainers log under another name.
KEY_ALIASES = {"lr": "learning_rate", "train/loss": "loss", "eval/loss": "eval_loss"}
_INT_FIELDS = ("global_step", "max_steps", "logging_steps", "eval_steps", "save_steps", "train_batch_size")


@dataclass
class StateResult:
    info: TrainerStateInfo | None
    # long columns in entry order (numpy arrays once read; lists when empty)
    steps: "np.ndarray | list" = field(default_factory=list)
    metrics: "np.ndarray | list" = field(default_factory=list)
    values: "np.ndarray | list" = field(default_factory=list)
    problems: list[ReadProblem] = field(default_factory=list)
    non_numeric: int = 0  # values that were neither numbers nor numeric strings (kept out of the scalars)


def _to_float(v) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        s = v.strip()
        try:
            return float(s)  # accepts "nan", "inf", "1e-5"
        except ValueError:
            return None
    return None


def _to_int(v) -> int | None:
    f = _to_float(v)
    if f is None or not math.isfinite(f):
        return None
    return int(f)


def read_trainer_state(path: str | Path) -> StateResult:
    p = Path(path)
    name = str(p)
    try:
        raw = p.read_bytes()
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
        size = re.search(r"^size (\d+)", text, re.M)
        what = f" of a {size.group(1)}-byte file" if size else ""
        return StateResult(None, problems=[ReadProblem(
            name, f"a Git LFS pointer{what}, not JSON: run `git lfs pull` to fetch the real file",
            kind="lfs-pointer", fatal=True)])
    problems: list[ReadProblem] = []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        data, salvaged = _salvage(text)
        if data is None:
            return StateResult(None, problems=[ReadProblem(
                name, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", offset=e.pos,
                kind="unreadable", fatal=True)])
        problems.append(ReadProblem(
            name, f"cut off or corrupt JSON ({e.msg} at byte {e.pos}); the {salvaged} log_history entries "
                  f"before it were used", offset=e.pos, kind="truncated"))
    if not isinstance(data, dict) or ("log_history" not in data and "global_step" not in data):
        what = type(data).__name__ if not isinstance(data, dict) else "an object without log_history/global_step"
        return StateResult(None, problems=problems + [ReadProblem(
            name, f"not a HF Trainer state ({what})", kind="not-trainer-state", fatal=True)])

    info = TrainerStateInfo(path=name)
    for key in _INT_FIELDS:
        setattr(info, key, _to_int(data.get(key)))
    nte = _to_float(data.get("num_train_epochs"))
    info.num_train_epochs = nte
    info.best_metric = data.get("best_metric")
    bmc = data.get("best_model_checkpoint")
    info.best_model_checkpoint = bmc if isinstance(bmc, str) else None
    info.is_hyper_param_search = data.get("is_hyper_param_search")

    history = data.get("log_history")
    res = StateResult(info, problems=problems)
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
    return res


def _entry_steps(history: list, info: TrainerStateInfo) -> list[int]:
    """The step of every entry; an entry without one (e.g. predict_* results appended after training)
    is attached to the step of the entry before it."""
    steps = []
    last = 0
    for entry in history:
        st = _to_int(entry.get("step")) if isinstance(entry, dict) else None
        if st is None:
            if isinstance(entry, dict):
                info.entries_without_step += 1
            st = last
        else:
            last = st
        steps.append(st)
    return steps


def _flatten(history: list, res: StateResult) -> None:
    """log_history -> long columns in entry order. Entries are grouped by their key tuple (a 143k-step
    history has a handful of distinct ones) so that each group converts to floats in one numpy call;
    a group holding strings or nulls falls back to converting value by value."""
    info = res.info
    entry_steps = _entry_steps(history, info)
    groups: dict[tuple, list[int]] = {}
    for i, entry in enumerate(history):
        if isinstance(entry, dict):
            groups.setdefault(tuple(entry), []).append(i)
        else:
            res.non_numeric += 1
    order_parts, step_parts, metric_parts, value_parts = [], [], [], []
    width = max((len(k) for k in groups), default=1) + 1  # entry index * width + key position = entry order
    for keys, idx in groups.items():
        keys = tuple(k for k in keys if k != "step")
        if not keys:
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
                    f = _to_float(v)
                    if f is None:
                        res.non_numeric += 1
                    else:
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
    if not order_parts:
        return
    order = np.concatenate(order_parts)
    perm = np.argsort(order, kind="stable")  # back to entry order, keys in their order within an entry
    res.steps = np.concatenate(step_parts)[perm]
    res.metrics = np.concatenate(metric_parts)[perm]
    res.values = np.concatenate(value_parts)[perm]


def _salvage(text: str):
    """Parse the log_history entries of a cut-off file one by one; returns (data, n_entries) or (None, 0)."""
    m = re.search(r'"log_history"\s*:\s*\[', text)
    if not m:
        return None, 0
    dec = json.JSONDecoder()
    pos = m.end()
    entries = []
    n = len(text)
    while pos < n:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            break
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        entries.append(obj)
    data: dict = {"log_history": entries}
    for key in _INT_FIELDS + ("best_metric", "best_model_checkpoint", "num_train_epochs"):
        mm = re.search(rf'"{key}"\s*:\s*("(?:[^"\\]|\\.)*"|[-0-9.eE+]+|null|NaN|Infinity)', text)
        if mm:
            try:
                data[key] = json.loads(mm.group(1))
            except json.JSONDecodeError:
                pass
    return data, len(entries)
