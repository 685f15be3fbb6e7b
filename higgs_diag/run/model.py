"""The data model of a read run: what every reader produces and every check consumes.

A ``Run`` holds one tidy long scalars DataFrame with columns
``step`` (int64), ``metric`` (str, canonical name), ``value`` (float64, NaN/Inf kept),
``source`` (str, ``trainer_state``, ``tensorboard`` or ``console``), ``wall_time`` (float64, NaN when unknown),
``file`` (str, the file the point came from) and ``segment`` (int, 0 for the first training session,
+1 at each resume detected in that file's sequence of steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .. import layout

SCALAR_COLUMNS = ["step", "metric", "value", "source", "wall_time", "file", "segment"]
# which source Run.series prefers when two have as many points of a metric (files written by the Trainer first)
SOURCE_PRIORITY = {"trainer_state": 2, "tensorboard": 1, "console": 0}


def pick_source(counts) -> str:
    """The source ``Run.series`` reads a metric from, given ``{source: number of points}`` (a dict or a Series):
    the most points, then ``SOURCE_PRIORITY``."""
    return max(counts.keys(), key=lambda src: (counts[src], SOURCE_PRIORITY.get(src, -1)))


def empty_scalars() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": pd.Series([], dtype="int64"),
            "metric": pd.Series([], dtype="object"),
            "value": pd.Series([], dtype="float64"),
            "source": pd.Series([], dtype="object"),
            "wall_time": pd.Series([], dtype="float64"),
            "file": pd.Series([], dtype="object"),
            "segment": pd.Series([], dtype="int64"),
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
    @property
    def metrics(self) -> list[str]:
        if self.scalars.empty:
            return []
        self.series("")  # builds the per-metric index once
        return sorted(k for k in self._series_cache[None] if isinstance(k, str))

    def has(self, metric: str) -> bool:
        return not self.series(metric).empty

    def series(self, metric: str) -> pd.Series:
        """One value per step for ``metric``: from the source that has the most points for it (on ties
        trainer_state, then tensorboard, then console: ``pick_source``), sorted by step. When a resumed run
        logged a step twice, the later entry wins (it is what the continuing run saw). NaN/Inf are kept."""
        if metric in self._series_cache:
            return self._series_cache[metric]
        df = self.scalars
        groups = self._series_cache.get(None)
        if groups is None:  # one pass over the scalars for all metrics
            groups = df.groupby("metric", sort=False).indices if not df.empty else {}
            self._series_cache[None] = groups
        pos = groups.get(metric)
        sub = df.iloc[pos] if pos is not None else df.iloc[0:0]
        if sub.empty:
            s = pd.Series([], dtype="float64", name=metric)
            s.index = pd.Index([], dtype="int64", name="step")
        else:
            counts = sub.groupby("source", observed=True)["step"].size()
            best = pick_source(counts)
            sub = sub[sub["source"] == best]
            # keep file order (appearance) then the last occurrence of each step
            sub = sub.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
            s = pd.Series(sub["value"].to_numpy(dtype="float64"), index=pd.Index(sub["step"].to_numpy(dtype="int64"), name="step"), name=metric)
        self._series_cache[metric] = s
        return s

    def all_steps(self, metric: str) -> np.ndarray:
        """Every step at which ``metric`` was logged, in any source (duplicates kept)."""
        self.series("")  # builds the per-metric index once
        pos = self._series_cache[None].get(metric)
        if pos is None:
            return np.zeros(0, dtype="int64")
        return self.scalars["step"].to_numpy()[pos]

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

