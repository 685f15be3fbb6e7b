"""discover -> read -> one ``Run``: the only place that knows every kind of file a run has."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..layout import is_checkpoint_name
from .discover import RunFiles, RunReadError, discover
from .checkpoint_meta import weights_dtype
from .logs import read_console
from .read_worker import EventWorker
from .model import STEP_INT32_LIMIT, ReadProblem, Run, SCALAR_COLUMNS, empty_scalars
from .trainer_state import KEY_ALIASES, read_trainer_state


def canonical_tag(tag: str) -> str:
    """TensorBoard tag -> the name the trainer_state.json uses: ``train/loss`` -> ``loss``,
    ``eval/loss`` -> ``eval_loss``, ``train/learning_rate`` -> ``learning_rate``."""
    if tag.startswith("train/"):
        name = tag[6:]
    elif tag.startswith("eval/"):
        name = "eval_" + tag[5:]
    else:
        name = tag
    return KEY_ALIASES.get(name, name)


def _code_dtype(n_categories: int) -> np.dtype:
    """The integer type pandas keeps a categorical's codes in for ``n_categories`` (so that
    ``Categorical.from_codes`` takes the codes as they are, without a copy)."""
    for t in (np.int8, np.int16, np.int32):
        if n_categories < np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


def _small_int(hi: int) -> np.dtype:
    """The smallest signed integer type holding 0..``hi``."""
    for t in (np.int8, np.int16, np.int32):
        if hi <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


def _segments(step: np.ndarray, metric_codes: np.ndarray, n_metrics: int) -> np.ndarray | None:
    """One file's points in file order: per metric, +1 each time the step goes backwards (a resumed run).
    None when no step goes backwards (every segment 0): then the file's steps never decrease, which one pass
    shows. Otherwise the points are grouped by metric with a stable sort of the small integer codes (numpy's
    radix sort: linear; file order kept within a metric) and the step-backs counted per group."""
    if len(step) < 2 or not (step[1:] < step[:-1]).any():
        return None
    key = metric_codes.astype(np.int16 if n_metrics < np.iinfo(np.int16).max else np.int64)
    order = np.argsort(key, kind="stable")
    k, st = key[order], step[order]
    same = k[1:] == k[:-1]
    csum = np.zeros(len(k), dtype=np.int64)
    np.cumsum(same & (st[1:] < st[:-1]), out=csum[1:])
    starts = np.flatnonzero(np.concatenate(([True], ~same)))  # each metric's first row
    seg = np.empty(len(k), dtype=np.int64)
    seg[order] = csum - np.repeat(csum[starts], np.diff(np.append(starts, len(k))))
    return seg


def _categorical_metric(names: np.ndarray | pd.Categorical) -> pd.Categorical:
    """Canonical metric names as a categorical (TensorBoard tags mapped; several tags may map to one)."""
    cat = names if isinstance(names, pd.Categorical) else pd.Categorical(names)
    canon = [canonical_tag(str(c)) for c in cat.categories]
    uniq = list(dict.fromkeys(canon))
    if uniq == canon and cat.codes.dtype == _code_dtype(len(uniq)):  # nothing renamed: the codes as they are
        return pd.Categorical.from_codes(cat.codes, dtype=pd.CategoricalDtype(pd.Index(uniq, dtype=object)),
                                         validate=False)
    return pd.Categorical.from_codes(_remapped(cat.codes, [uniq.index(c) for c in canon], len(uniq)),
                                     dtype=pd.CategoricalDtype(pd.Index(uniq, dtype=object)), validate=False)


def _remapped(codes: np.ndarray, new: list[int], n_new: int, out: np.ndarray | None = None) -> np.ndarray:
    """Categorical ``codes`` renumbered (code i becomes ``new[i]``; -1 stays -1), in the codes type of
    ``n_new`` categories (into ``out`` when given)."""
    table = np.array([*new, -1], dtype=_code_dtype(n_new))  # index -1 reads the last entry: -1
    if out is None:
        return table[codes]
    np.take(table, codes, out=out)
    return out


def _assemble(parts: list[dict]) -> pd.DataFrame:
    """One tidy frame from the per-file columns, in as few bytes per point as hold them exactly: ``step``
    int32 when every step fits ``model.STEP_INT32_LIMIT`` (int64 otherwise), ``value`` and ``wall_time`` float64,
    ``metric``, ``source`` and ``file`` categoricals (int8 codes for up to 126 values), ``segment`` the smallest
    integer type its largest value fits. Each column is written once: a file's arrays are copied into the
    column preallocated for all files (or used as they are when there is only one file and the type matches),
    and a file's arrays are let go as soon as they are copied (``parts`` is emptied)."""
    if not parts:
        return empty_scalars()
    counts = [len(p["step"]) for p in parts]
    n = sum(counts)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    one = len(parts) == 1

    def column(key: str, dtype, fill=None) -> np.ndarray:
        arrays = [p[key] for p in parts]
        for p in parts:
            p[key] = None  # the copy below is the only one kept
        if one and arrays[0] is not None and arrays[0].dtype == dtype:
            return arrays[0]
        out = np.empty(n, dtype=dtype)
        for i in range(len(arrays)):
            a, arrays[i] = arrays[i], None
            out[bounds[i]:bounds[i + 1]] = a if a is not None else fill
        return out

    # metric: the union of the files' categories in order of appearance (as pandas.union_categoricals)
    union: dict[str, int] = {}
    for p in parts:
        for c in p["metric"].categories:
            union.setdefault(c, len(union))
    metric_codes = np.empty(n, dtype=_code_dtype(len(union))) if not one else None
    segs: list[np.ndarray | None] = []
    lo, hi = 0, 0
    for i, p in enumerate(parts):
        m, st = p["metric"], p["step"]
        new = [union[c] for c in m.categories]
        if one:
            metric_codes = m.codes if new == list(range(len(new))) else _remapped(m.codes, new, len(union))
            codes = metric_codes
        else:
            codes = _remapped(m.codes, new, len(union), out=metric_codes[bounds[i]:bounds[i + 1]])
        p["metric"] = None
        segs.append(_segments(st, codes, len(union)))
        if len(st):
            lo, hi = min(lo, int(st.min())), max(hi, int(st.max()))
    step_dtype = np.int32 if -STEP_INT32_LIMIT <= lo and hi < STEP_INT32_LIMIT else np.int64
    seg_dtype = _small_int(max((int(s.max()) for s in segs if s is not None), default=0))
    segment = np.zeros(n, dtype=seg_dtype)
    for i, s in enumerate(segs):
        if s is not None:
            segment[bounds[i]:bounds[i + 1]] = s
    del segs
    files = [p["file"] for p in parts]
    sources = list(dict.fromkeys(p["source"] for p in parts))
    file_codes = np.repeat(np.arange(len(files), dtype=_code_dtype(len(files))), counts)
    source_codes = np.repeat(np.array([sources.index(p["source"]) for p in parts],
                                      dtype=_code_dtype(len(sources))), counts)
    categorical = lambda codes, names: pd.Categorical.from_codes(  # noqa: E731
        codes, dtype=pd.CategoricalDtype(pd.Index(names, dtype=object)), validate=False)
    cols = {
        "step": column("step", np.dtype(step_dtype)),
        "metric": categorical(metric_codes, list(union)),
        "value": column("value", np.dtype(np.float64)),
        "source": categorical(source_codes, sources),
        "wall_time": column("wall_time", np.dtype(np.float64), fill=np.nan),
        "file": categorical(file_codes, files),
        "segment": segment,
    }
    parts.clear()
    return pd.DataFrame(cols, columns=SCALAR_COLUMNS, copy=False)  # copy=False: no consolidation copy


def _parse_json_text(text: str, file: str, what: str, problems: list[ReadProblem]) -> dict | None:
    try:
        obj = json.loads(text)
    except (ValueError, TypeError, RecursionError):  # JSONDecodeError is a ValueError; so are 4,301-digit ints
        problems.append(ReadProblem(file, f"the `{what}` text summary is not JSON; ignored", kind="unreadable"))
        return None
    return obj if isinstance(obj, dict) else None


def total_bytes(files: RunFiles) -> int:
    """The bytes load_run will read: what a progress bar counts."""
    size = 0
    for p in [*files.trainer_states, *files.event_files, *files.log_files]:
        try:
            size += p.stat().st_size
        except OSError:
            pass
    return size


def _size(p) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def load_run(path: str | os.PathLike, log_files=None, progress=None, files: RunFiles | None = None) -> Run:
    """Read everything the run has. ``progress(nbytes)`` is called after each file (for a progress bar);
    ``files`` lets a caller that already discovered the run skip a second walk."""
    files = files or discover(path, log_files)
    if files.empty:
        raise RunReadError(f"{path}: no trainer_state.json, TensorBoard event file, checkpoint or log found")
    worker = EventWorker.start(files, _size)  # the event files on the other core while the state files are read
    try:
        return _read(path, files, progress or (lambda n: None), worker)
    finally:
        if worker is not None:
            worker.close()


def _read(path, files: RunFiles, tick, worker: "EventWorker | None") -> Run:
    size = _size
    run = Run(root=str(path))
    run.checkpoints = files.checkpoints
    for c in run.checkpoints:  # a header read each: the weights are never loaded
        if c.has_full_model or c.has_adapter:
            c.dtype, c.dtype_from = weights_dtype(c.path)
    run.other_files = [f for f, _ in files.not_read]
    parts: list[dict] = []  # per-file columns, assembled once at the end

    # trainer_state.json: every one is read for its fields, the most complete log_history is used.
    results = []
    for p in files.trainer_states:
        res = read_trainer_state(p)
        tick(size(p))
        run.problems.extend(res.problems)
        if res.info is not None:
            run.states.append(res.info)
            run.files_read.append(str(p))
            results.append(res)
    if results:
        def completeness(r):
            gs = r.info.global_step if r.info.global_step is not None else -1
            top = not is_checkpoint_name(Path(r.info.path).parent.name)
            return (gs, r.info.n_entries, top)

        best = max(results, key=completeness)
        run.state = best.info
        if len(best.steps):
            parts.append({"step": np.asarray(best.steps, dtype="int64"),
                          "metric": _categorical_metric(best.metric_categorical()),
                          "value": np.asarray(best.values, dtype="float64"),
                          "wall_time": np.full(len(best.steps), np.nan),
                          "source": "trainer_state", "file": best.info.path})

    # TensorBoard event files, oldest first, all merged (read by the worker started above when there is one).
    if files.event_files:
        results_ev = worker.results() if worker is not None else None
        for i, p in enumerate(files.event_files):
            if results_ev is not None and i < len(results_ev):
                ev, results_ev[i] = results_ev[i], None
            else:  # serial, or what the worker did not read: read here (a reader's exception surfaces here)
                from .events import read_event_file

                ev = read_event_file(p)
            tick(size(p))
            _add_event_file(run, parts, p, ev)
            del ev  # the frame's columns live on in ``parts`` only, until _assemble copies them

    # Console logs: messages, what they say about the end of training, and the series they printed.
    for p in files.log_files:
        res = read_console(p)
        tick(size(p))
        run.log_events.extend(res.events)
        run.problems.extend(res.problems)
        if res.info is not None:
            run.consoles.append(res.info)
        if not res.problems:
            run.files_read.append(str(p))
        if len(res.steps):
            parts.append({"step": np.frombuffer(res.steps, dtype=np.int64),
                          "metric": _categorical_metric(pd.Categorical.from_codes(
                              np.frombuffer(res.metric_codes, dtype=np.int64),
                              categories=pd.Index(res.metric_names, dtype=object))),
                          "value": np.frombuffer(res.values, dtype=np.float64),
                          "wall_time": None,  # NaN: a console line has no time
                          "source": "console", "file": str(p)})

    run.scalars = _assemble(parts)

    if not _usable(run):
        reasons = "; ".join(str(p) for p in run.problems) or f"{path}: nothing a diagnosis can use"
        raise RunReadError(reasons)
    return run


def _add_event_file(run: Run, parts: list[dict], p, ev) -> None:
    """One event file's result into the run: its problems, its scalars (a part), its args/model_config."""
    run.problems.extend(ev.problems)
    if ev.n_records or not ev.problems:
        run.files_read.append(str(p))
    if len(ev.scalars):
        sc = ev.scalars
        tags = sc["tag"].array if isinstance(sc["tag"].dtype, pd.CategoricalDtype) else sc["tag"].to_numpy()
        parts.append({"step": sc["step"].to_numpy(dtype="int64"),
                      "metric": _categorical_metric(tags),
                      "value": sc["value"].to_numpy(dtype="float64"),
                      "wall_time": sc["wall_time"].to_numpy(dtype="float64"),
                      "source": "tensorboard", "file": str(p)})
    for what, attr in (("args", "args"), ("model_config", "model_config")):
        if what in ev.texts:
            obj = _parse_json_text(ev.texts[what], str(p), what, run.problems)
            if obj is not None:  # the newest file wins (files are read oldest first)
                setattr(run, attr, obj)
                setattr(run, attr + "_file", str(p))


def _usable(run: Run) -> bool:
    """Whether anything a check can use was read: scalars, a Trainer state, the logged arguments, a console
    message that matters or the training progress a console showed, or a checkpoint left half-saved (the
    signature of the KeyError at save). Files that were opened but held none of these (a log without any known
    message) do not count."""
    half_saved = any(not c.has_trainer_state and (c.has_full_model or c.has_adapter) for c in run.checkpoints)
    progress = any(c.last_step is not None for c in run.consoles)
    return bool(len(run.scalars) or run.states or run.args or run.model_config or run.log_events or half_saved
                or progress)
