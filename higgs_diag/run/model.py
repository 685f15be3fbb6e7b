"""The data model of a read run: what every reader produces and every check consumes.

A ``Run`` holds one tidy long scalars DataFrame with columns
``step`` (int32 when every step is within ``STEP_INT32_LIMIT``, else int64), ``metric`` (categorical of str,
canonical name), ``value`` (float64, NaN/Inf kept), ``source`` (categorical: ``trainer_state``, ``tensorboard``
or ``console``), ``wall_time`` (float64, NaN when unknown), ``file`` (categorical: the file the point came from)
and ``segment`` (the smallest signed int its values fit, usually int8: 0 for the first training session, +1 at
each resume detected in that file's sequence of steps). 24 bytes per point with int32 steps (the run loader
builds it: ``run/load.py``). Frames built by hand (tests) may use int64 and str columns; readers of the frame
must accept both (``Run.series`` gives int64 steps either way).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .. import layout

SCALAR_COLUMNS = ["step", "metric", "value", "source", "wall_time", "file", "segment"]
# steps are kept as int32 when all are in [-STEP_INT32_LIMIT, STEP_INT32_LIMIT): the difference of any two then
# fits int32 too (np.diff over the column cannot overflow); a run of 2**30 steps or more gets int64
STEP_INT32_LIMIT = 2**30
# which source Run.series prefers when two have as many points of a metric (files written by the Trainer first)
SOURCE_PRIORITY = {"trainer_state": 2, "tensorboard": 1, "console": 0}


def pick_source(counts) -> str:
    """The source ``Run.series`` reads a metric from, given ``{source: number of points}`` (a dict or a Series):
    the most points, then ``SOURCE_PRIORITY``."""
    return max(counts.keys(), key=lambda src: (counts[src], SOURCE_PRIORITY.get(src, -1)))


def empty_scalars() -> pd.DataFrame:
    """The scalars of a run without points, in the loader's column types."""
    label = lambda: pd.Series(pd.Categorical([], categories=pd.Index([], dtype=object)))  # noqa: E731
    return pd.DataFrame(
        {
            "step": pd.Series([], dtype="int32"),
            "metric": label(),
            "value": pd.Series([], dtype="float64"),
            "source": label(),
            "wall_time": pd.Series([], dtype="float64"),
            "file": label(),
            "segment": pd.Series([], dtype="int8"),
        }
    )


@dataclass
class ReadProblem:
    """Something in a file that could not be read (fully). Becomes a finding; never a traceback."""

    file: str
    message: str
    offset: int | None = None  # byte offset, for binary files
    kind: str = "unreadable"  # unreadable | truncated | crc | not-trainer-state | lfs-pointer | empty
    fatal: bool = False  # True when nothing of the file could be used

    def __str__(self) -> str:
        where = f" at byte {self.offset}" if self.offset is not None else ""
        return f"{self.file}{where}: {self.message}"


@dataclass
class TrainerStateInfo:
    """The scalar fields of one trainer_state.json (its log_history goes into the scalars)."""

    path: str
    global_step: int | None = None
    max_steps: int | None = None
    num_train_epochs: float | None = None
    logging_steps: int | None = None
    eval_steps: int | None = None
    save_steps: int | None = None
    train_batch_size: int | None = None
    best_metric: Any = None
    best_model_checkpoint: str | None = None
    n_entries: int = 0
    entries_without_step: int = 0
    is_hyper_param_search: bool | None = None


@dataclass
class CheckpointInfo:
    """One checkpoint folder: its step (None for ``last-checkpoint``) and its files, relative, ``/``-separated."""

    path: str
    step: int | None
    files: list[str]
    dtype: str | None = None  # the weights' dtype (safetensors header, else config.json torch_dtype)
    dtype_from: str | None = None

    @property
    def has_trainer_state(self) -> bool:
        return layout.TRAINER_STATE in self.files

    @property
    def has_full_model(self) -> bool:
        return layout.has_full_model(self.files)

    @property
    def has_adapter(self) -> bool:
        return layout.has_adapter(self.files)

    @property
    def has_optimizer(self) -> bool:
        return layout.OPTIMIZER in self.files

    @property
    def has_training_args_bin(self) -> bool:
        return layout.TRAINING_ARGS in self.files

    @property
    def rng_state_files(self) -> list[str]:
        return [f for f in self.files if layout.is_rng_state(f)]


@dataclass
class LogEvent:
    """A message that matters, found in a console log (the kinds are the names in ``run/console.FORMATS``)."""

    kind: str  # metric-keyerror | no-loss | early-stopping-disabled | newly-initialized | rng-unpickling | traceback |
    #            training-completed | batch-no-get | batch-no-len | peft-labels
    file: str
    line: int  # 1-based
    text: str
    step: int | None = None  # the training step the console showed at that point (rank 0), when known
    rank: int | None = None  # the ``[rankN]:`` prefix of the line, None when unprefixed
    context: tuple[str, ...] = ()  # for an exception: its innermost traceback frames, ``file:line in function``


@dataclass
class ConsoleInfo:
    """What one console log says about the end of training (the facts the early-stop rule judges).

    ``last_step`` is the last training step the console showed in its last training session (the HF Trainer's
    progress bar, or a custom loop's ``Step N`` lines); ``max_steps`` that session's progress-bar total;
    ``completed`` whether the end-of-training summary (``{'train_runtime': ...}`` or "Training completed.")
    came after the last training progress."""

    file: str
    max_steps: int | None = None
    max_steps_from: str = ""  # where the console gave max_steps: its progress bar or "Total optimization steps"
    last_step: int | None = None
    last_step_line: int | None = None
    completed: bool = False
    completed_line: int | None = None
    session_start_line: int = 1
    sessions: int = 0
    last_line: str = ""
    last_line_no: int | None = None
    lines: int = 0
    ranks: tuple[int, ...] = ()
    points: int = 0  # scalar points placed
    unplaced: int = 0  # log dicts / component prints that had no step (no progress bar, no Step N line)
    cut_segments: int = 0  # segments longer than the reader keeps (cut to MAX_SEGMENT_BYTES)


_INDEX = ("__scalar_index__",)  # the key of the index in Run._series_cache (no metric name is a tuple)
_NO_POSITIONS = np.zeros(0, dtype=np.intp)
_INT_COLUMNS = ("step", "segment")


class _ScalarIndex:
    """Numpy views of one scalars frame, computed on first use: columns, label codes, positions per metric."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self._columns: dict[str, np.ndarray] = {}
        self._codes: dict[str, tuple[np.ndarray, list]] = {}
        self._chosen: dict[str, np.ndarray] = {}
        self.derived: dict = {}  # Run.cached
        self._step_indexes: list[pd.Index] = []  # step_index
        self.positions: dict = {}
        if len(frame):
            codes, names = self.codes("metric")
            self.positions = _group_positions(codes, names)

    def column(self, name: str) -> np.ndarray:
        col = self._columns.get(name)
        if col is None:
            if name not in self.frame.columns and name == "segment":
                col = np.zeros(len(self.frame), dtype=np.int64)
            else:
                col = self.frame[name].to_numpy()
                if name in _INT_COLUMNS:  # kept in the frame's integer type (int32 steps: no copy)
                    col = col if col.dtype.kind in "iu" else col.astype(np.int64)
                else:
                    col = col.astype(np.float64, copy=False)
            self._columns[name] = col
        return col

    def codes(self, name: str) -> tuple[np.ndarray, list]:
        got = self._codes.get(name)
        if got is None:
            col = self.frame[name]
            if isinstance(col.dtype, pd.CategoricalDtype):
                got = (col.array.codes, list(col.cat.categories))  # a read-only view (.cat.codes copies)
            else:
                codes, uniques = pd.factorize(col.to_numpy(dtype=object), use_na_sentinel=True)
                got = (codes, list(uniques))
            self._codes[name] = got
        return got

    def step_index(self, steps: np.ndarray) -> pd.Index:
        """A ``step`` index (int64) of these steps, the same object for every series with the same steps: the
        metrics one log line carries (loss, grad_norm, learning_rate, ...) share one index, not one each."""
        for known in self._step_indexes:
            if len(known) == len(steps) and known[0] == steps[0] and known[-1] == steps[-1] \
                    and np.array_equal(known.to_numpy(), steps):
                return known
        index = pd.Index(steps, dtype="int64", name="step", copy=False)
        if len(steps):
            self._step_indexes.append(index)
        return index

    def chosen(self, metric) -> np.ndarray:
        """The positions of ``metric``'s points in the source ``pick_source`` chooses, in reading order."""
        got = self._chosen.get(metric) if isinstance(metric, str) else None
        if got is not None:
            return got
        pos = self.positions.get(metric, _NO_POSITIONS)
        if len(pos):
            src_codes, src_names = self.codes("source")
            sc = src_codes[pos]
            n = np.bincount(sc + 1, minlength=len(src_names) + 1)[1:]
            # the sources present, in the order a groupby lists them (sorted), with their counts
            present = sorted((name, int(n[k])) for k, name in enumerate(src_names) if n[k] > 0) \
                if not _categorical(self.frame["source"]) else \
                [(name, int(n[k])) for k, name in enumerate(src_names) if n[k] > 0]
            if present:
                best = pick_source(dict(present))
                codes_of_best = [k for k, name in enumerate(src_names) if name == best]
                if int(n[codes_of_best].sum()) < len(pos):  # else all its points are that source's: no copy
                    pos = pos[np.isin(sc, codes_of_best)] if len(codes_of_best) > 1 else pos[sc == codes_of_best[0]]
            else:
                pos = _NO_POSITIONS
        if isinstance(metric, str):
            self._chosen[metric] = pos
        return pos


def _categorical(col) -> bool:
    return isinstance(col.dtype, pd.CategoricalDtype)


def _group_positions(codes: np.ndarray, names: list) -> dict:
    """{name: the ascending row positions whose code is that name's}, for the names that occur (-1: none).
    Positions are int32 when the frame has fewer than 2**31 rows (half the memory of intp: a 20 M-point run)."""
    small = np.int32 if len(codes) < 2**31 else np.intp
    if len(names) <= 16:  # a few names (the usual run): one comparison pass per name beats a sort
        out = {}
        for k, name in enumerate(names):
            pos = np.flatnonzero(codes == k).astype(small)
            if len(pos):
                out[name] = np.sort(np.concatenate((out[name], pos))) if name in out else pos
        return out
    c = codes.astype(np.int16 if len(names) < 32000 else np.int64) + 1
    order = np.argsort(c, kind="stable").astype(small, copy=False)
    bounds = np.concatenate(([0], np.cumsum(np.bincount(c, minlength=len(names) + 1))))
    out = {}
    for k, name in enumerate(names):
        lo, hi = bounds[k + 1], bounds[k + 2]
        if hi > lo:
            if name in out:  # two codes for one value (an object column with mixed equal values)
                out[name] = np.sort(np.concatenate((out[name], order[lo:hi])))
            else:
                out[name] = order[lo:hi]
    return out


@dataclass
class Run:
    root: str
    scalars: pd.DataFrame = field(default_factory=empty_scalars)
    args: dict[str, Any] | None = None  # TrainingArguments, from the `args` text summary
    args_file: str | None = None
    model_config: dict[str, Any] | None = None
    model_config_file: str | None = None
    state: TrainerStateInfo | None = None  # the most complete trainer_state.json
    states: list[TrainerStateInfo] = field(default_factory=list)  # all that were read
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    log_events: list[LogEvent] = field(default_factory=list)
    consoles: list[ConsoleInfo] = field(default_factory=list)  # one per console log read
    problems: list[ReadProblem] = field(default_factory=list)
    files_read: list[str] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)  # inventoried, not read (training_args.bin)
    _series_cache: dict = field(default_factory=dict, repr=False)

    # ---- access helpers used by the checks -------------------------------------------------------
    # The checks read the scalars through these, as numpy arrays built once per Run (``_index``): a column, a
    # categorical column's integer codes, each metric's row positions, and ``series``. Nothing here re-filters
    # the frame per call. The index is rebuilt when ``scalars`` is replaced by another frame.
    def _index(self) -> "_ScalarIndex":
        idx = self._series_cache.get(_INDEX)
        if idx is None or idx.frame is not self.scalars:
            self._series_cache.clear()
            idx = self._series_cache[_INDEX] = _ScalarIndex(self.scalars)
        return idx

    @property
    def metrics(self) -> list[str]:
        return sorted(k for k in self._index().positions if isinstance(k, str))

    def has(self, metric: str) -> bool:
        return not self.series(metric).empty

    def column(self, name: str) -> np.ndarray:
        """A scalars column as a numpy array, built once: ``step`` and ``segment`` in the frame's integer type
        (int32 or int64 steps: widen before subtracting far-apart steps), ``value`` and ``wall_time`` float64; a
        missing ``segment`` column reads as zeros."""
        return self._index().column(name)

    def codes(self, name: str) -> tuple[np.ndarray, list]:
        """(integer code of every row, the value of each code) for a label column (``metric``, ``source``,
        ``file``); -1 where the value is missing. Built once."""
        return self._index().codes(name)

    def positions(self, metric: str) -> np.ndarray:
        """The row positions of ``metric``'s points in every source, in reading order (empty when absent)."""
        return self._index().positions.get(metric, _NO_POSITIONS)

    def source_positions(self, metric: str) -> np.ndarray:
        """The row positions of the points ``series(metric)`` reads (its source's, see ``pick_source``), in
        reading order, duplicates of a step included."""
        return self._index().chosen(metric)

    def series(self, metric: str) -> pd.Series:
        """One value per step for ``metric``: from the source that has the most points for it (on ties
        trainer_state, then tensorboard, then console: ``pick_source``), sorted by step. When a resumed run
        logged a step twice, the later entry wins (it is what the continuing run saw). NaN/Inf are kept."""
        idx = self._index()
        s = self._series_cache.get(metric) if isinstance(metric, str) else None
        if s is not None:
            return s
        pos = idx.chosen(metric)
        steps = idx.column("step")[pos].astype(np.int64, copy=False)
        if len(steps) > 1 and not (steps[1:] > steps[:-1]).all():
            # keep the last occurrence (in reading order) of each step, sorted by step; steps already in order
            # with repeats (an evaluation logging epoch again at its step) need no sort
            order = None if (steps[1:] >= steps[:-1]).all() else np.argsort(steps, kind="stable")
            ss = steps if order is None else steps[order]
            last = np.empty(len(ss), dtype=bool)
            np.not_equal(ss[1:], ss[:-1], out=last[:-1])
            last[-1] = True
            pos, steps = (pos[last], ss[last]) if order is None else (pos[order[last]], ss[last])
        s = pd.Series(idx.column("value")[pos], index=idx.step_index(steps), name=metric, copy=False)
        if isinstance(metric, str):
            self._series_cache[metric] = s
        return s

    def all_steps(self, metric: str) -> np.ndarray:
        """Every step at which ``metric`` was logged, in any source (duplicates kept)."""
        return self.column("step")[self.positions(metric)]

    def cached(self, key, compute):
        """``compute()``, computed once per Run and ``key`` (a hashable tuple naming the helper and its
        parameters), so that rules sharing a derived result (restart points, spikes) compute it once; dropped
        with the index when ``scalars`` is replaced. Unhashable keys are computed every time."""
        idx = self._index()
        try:
            return idx.derived[key]
        except KeyError:
            pass
        except TypeError:
            return compute()
        value = idx.derived[key] = compute()
        return value

    def arg(self, name: str, default: Any = None) -> Any:
        if self.args and name in self.args:
            return self.args[name]
        return default

    def config(self, name: str, default: Any = None) -> Any:
        if self.model_config and name in self.model_config:
            return self.model_config[name]
        return default

    @property
    def last_step(self) -> int | None:
        steps = []
        if not self.scalars.empty:
            steps.append(int(self.scalars["step"].max()))
        if self.state and self.state.global_step is not None:
            steps.append(int(self.state.global_step))
        return max(steps) if steps else None

    @property
    def n_points(self) -> int:
        return int(len(self.scalars))

