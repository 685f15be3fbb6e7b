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
from .model import ReadProblem, Run, SCALAR_COLUMNS, empty_scalars
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


def _segments(step: np.ndarray, file_codes: np.ndarray, metric_codes: np.ndarray, n_metrics: int) -> np.ndarray:
    """Per (file, metric) in file order: +1 each time the step goes backwards (a resumed run)."""
    if len(step) == 0:
        return np.zeros(0, dtype="int64")
    key = file_codes.astype(np.int64) * max(n_metrics, 1) + metric_codes.astype(np.int64)
    order = np.argsort(key, kind="stable")
    k, st = key[order], step[order]
    back = np.zeros(len(k), dtype=np.int64)
    back[1:] = (k[1:] == k[:-1]) & (st[1:] < st[:-1])
    csum = np.cumsum(back)
    starts = np.ones(len(k), dtype=bool)
    starts[1:] = k[1:] != k[:-1]
    group_base = np.maximum.accumulate(np.where(starts, csum, 0))  # csum at each group's first row
    seg = np.empty(len(k), dtype=np.int64)
    seg[order] = csum - group_base
    return seg


def _categorical_metric(names: np.ndarray | pd.Categorical) -> pd.Categorical:
    """Canonical metric names as a categorical (TensorBoard tags mapped; several tags may map to one)."""
    cat = names if isinstance(names, pd.Categorical) else pd.Categorical(names)
    canon = [canonical_tag(str(c)) for c in cat.categories]
    uniq = list(dict.fromkeys(canon))
    remap = np.array([uniq.index(c) for c in canon], dtype=np.int32)
    codes = np.where(cat.codes >= 0, remap[np.maximum(cat.codes, 0)], -1)
    return pd.Categorical.from_codes(codes, categories=pd.Index(uniq, dtype=object))


def _assemble(parts: list[dict]) -> pd.DataFrame:
    """One tidy frame from the per-file columns; metric, source and file are categoricals (memory, speed)."""
    from pandas.api.types import union_categoricals

    if not parts:
        return empty_scalars()
    step = np.concatenate([p["step"] for p in parts]).astype(np.int64, copy=False)
    metric = union_categoricals([p["metric"] for p in parts], ignore_order=True)
    files = [p["file"] for p in parts]
    sources = list(dict.fromkeys(p["source"] for p in parts))
    counts = [len(p["step"]) for p in parts]
    file_codes = np.repeat(np.arange(len(files), dtype=np.int32), counts)
    source_codes = np.repeat(np.array([sources.index(p["source"]) for p in parts], dtype=np.int32), counts)
    df = pd.DataFrame({
        "step": step,
        "metric": metric,
        "value": np.concatenate([p["value"] for p in parts]).astype(np.float64, copy=False),
        "source": pd.Categorical.from_codes(source_codes, categories=pd.Index(sources, dtype=object)),
        "wall_time": np.concatenate([p["wall_time"] for p in parts]).astype(np.float64, copy=False),
        "file": pd.Categorical.from_codes(file_codes, categories=pd.Index(files, dtype=object)),
    })
    df["segment"] = _segments(step, file_codes, metric.codes, len(metric.categories))
    return df[SCALAR_COLUMNS]


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


def load_run(path: str | os.PathLike, log_files=None, progress=None, files: RunFiles | None = None) -> Run:
    """Read everything the run has. ``progress(nbytes)`` is called after each file (for a progress bar);
    ``files`` lets a caller that already discovered the run skip a second walk."""
    files = files or discover(path, log_files)
    tick = progress or (lambda n: None)

    def size(p):
        try:
            return p.stat().st_size
        except OSError:
            return 0

    if files.empty:
        raise RunReadError(f"{path}: no trainer_state.json, TensorBoard event file, checkpoint or log found")
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
                          "metric": _categorical_metric(np.asarray(best.metrics, dtype=object)),
                          "value": np.asarray(best.values, dtype="float64"),
                          "wall_time": np.full(len(best.steps), np.nan),
                          "source": "trainer_state", "file": best.info.path})

    # TensorBoard event files, oldest first, all merged.
    if files.event_files:
        from .events import read_event_file

        for p in files.event_files:
            ev = read_event_file(p)
            tick(size(p))
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
                          "wall_time": np.full(len(res.steps), np.nan),
                          "source": "console", "file": str(p)})

    run.scalars = _assemble(parts)

    if not _usable(run):
        reasons = "; ".join(str(p) for p in run.problems) or f"{path}: nothing a diagnosis can use"
        raise RunReadError(reasons)
    return run


def _usable(run: Run) -> bool:
    """Whether anything a check can use was read: scalars, a Trainer state, the logged arguments, a console
    message that matters or the training progress a console showed, or a checkpoint left half-saved (the
    signature of the KeyError at save). Files that were opened but held none of these (a log without any known
    message) do not count."""
    half_saved = any(not c.has_trainer_state and (c.has_full_model or c.has_adapter) for c in run.checkpoints)
    progress = any(c.last_step is not None for c in run.consoles)
    return bool(len(run.scalars) or run.states or run.args or run.model_config or run.log_events or half_saved
                or progress)
