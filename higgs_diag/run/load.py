"""discover -> read -> one ``Run``: the only place that knows every kind of file a run has."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .discover import RunFiles, RunReadError, discover
from .logs import read_log
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


def _segments(df: pd.DataFrame) -> np.ndarray:
    """Per (file, metric) in file order: +1 each time the step goes backwards (a resumed run)."""
    if df.empty:
        return np.zeros(0, dtype="int64")
    key = df["file"].astype(str) + "\x00" + df["metric"].astype(str)
    back = (df.groupby(key, sort=False)["step"].diff() < 0).astype("int64")
    return back.groupby(key, sort=False).cumsum().to_numpy(dtype="int64")


def _parse_json_text(text: str, file: str, what: str, problems: list[ReadProblem]) -> dict | None:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
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
    run.other_files = [f for f, _ in files.not_read]
    frames: list[pd.DataFrame] = []

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
            top = Path(r.info.path).parent.name.startswith("checkpoint-") is False
            return (gs, r.info.n_entries, top)

        best = max(results, key=completeness)
        run.state = best.info
        if best.steps:
            frames.append(pd.DataFrame({
                "step": np.asarray(best.steps, dtype="int64"),
                "metric": best.metrics,
                "value": np.asarray(best.values, dtype="float64"),
                "source": "trainer_state",
                "wall_time": np.nan,
                "file": best.info.path,
            }))

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
                tags = sc["tag"].astype(str)
                mapping = {t: canonical_tag(t) for t in tags.unique()}
                frames.append(pd.DataFrame({
                    "step": sc["step"].to_numpy(dtype="int64"),
                    "metric": tags.map(mapping).to_numpy(),
                    "value": sc["value"].to_numpy(dtype="float64"),
                    "source": "tensorboard",
                    "wall_time": sc["wall_time"].to_numpy(dtype="float64"),
                    "file": str(p),
                }))
            for what, attr in (("args", "args"), ("model_config", "model_config")):
                if what in ev.texts:
                    obj = _parse_json_text(ev.texts[what], str(p), what, run.problems)
                    if obj is not None:  # the newest file wins (files are read oldest first)
                        setattr(run, attr, obj)
                        setattr(run, attr + "_file", str(p))

    for p in files.log_files:
        events, problems = read_log(p)
        tick(size(p))
        run.log_events.extend(events)
        run.problems.extend(problems)
        if not problems:
            run.files_read.append(str(p))

    if frames:
        df = pd.concat(frames, ignore_index=True)
        df["segment"] = _segments(df)
        run.scalars = df[SCALAR_COLUMNS]
    else:
        run.scalars = empty_scalars()

    if not run.files_read and not run.checkpoints:
        reasons = "; ".join(str(p) for p in run.problems) or "nothing readable"
        raise RunReadError(reasons)
    return run
