"""What files a run has. RUN_DIR may be an output_dir (checkpoint-*/ and runs/), one checkpoint folder,
a logging folder with only event files, or one trainer_state.json / event file."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..layout import (EVENT_FILE_MARK, OPTIMIZER, SCHEDULER, TRAINER_STATE, TRAINING_ARGS, checkpoint_step,
                      is_checkpoint_name, is_event_file, is_rng_state)
from .model import CheckpointInfo

_SKIP_DIRS = {".git", "__pycache__", "node_modules", ".ipynb_checkpoints", "wandb"}
# Files inventoried but never loaded: pickles (arbitrary code on load) and large binaries.
NOT_READ = {
    TRAINING_ARGS: "a pickle of TrainingArguments; unpickling runs code, so the `args` text summary "
                   "in the TensorBoard events is read instead",
    OPTIMIZER: "optimizer state (pickle), not needed for the diagnosis",
    SCHEDULER: "scheduler state (pickle), not needed for the diagnosis",
}


class RunReadError(Exception):
    """Raised when nothing at all could be read from the given path (exit code 2)."""


def _event_sort_key(path: Path) -> tuple:
    # events.out.tfevents.<timestamp>.<host>.<pid>.<n>: order by timestamp, then the trailing counter.
    parts = path.name.split(EVENT_FILE_MARK, 1)[-1].split(".")
    ts = float(parts[0]) if parts and parts[0].replace(".", "", 1).isdigit() else 0.0
    tail = parts[-1] if parts else ""
    n = int(tail) if tail.isdigit() else 0
    return (ts, n, str(path))


@dataclass
class RunFiles:
    root: Path
    trainer_states: list[Path] = field(default_factory=list)
    event_files: list[Path] = field(default_factory=list)
    log_files: list[Path] = field(default_factory=list)
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    not_read: list[tuple[str, str]] = field(default_factory=list)  # (file, why)

    @property
    def empty(self) -> bool:
        return not (self.trainer_states or self.event_files or self.log_files or self.checkpoints)


def discover(path: str | os.PathLike, log_files: list[str | os.PathLike] | None = None) -> RunFiles:
    root = Path(path)
    if not root.exists():
        raise RunReadError(f"{root}: no such file or directory")
    files = RunFiles(root=root)
    if root.is_file():
        if is_event_file(root.name):
            files.event_files.append(root)
        elif root.suffix in (".log", ".txt", ".out", ".err"):
            files.log_files.append(root)
        else:  # any other single file is taken as a trainer_state.json
            files.trainer_states.append(root)
    else:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            here = Path(dirpath)
            if is_checkpoint_name(here.name):
                files.checkpoints.append(_inventory(here, checkpoint_step(here.name)))
            for name in sorted(filenames):
                p = here / name
                if name == TRAINER_STATE:
                    files.trainer_states.append(p)
                elif is_event_file(name):
                    files.event_files.append(p)
                elif name.endswith(".log"):
                    files.log_files.append(p)
                elif name in NOT_READ or is_rng_state(name):
                    files.not_read.append((str(p), NOT_READ.get(name, "RNG state (pickle), not needed")))
        files.checkpoints.sort(key=lambda c: (c.step is None, c.step or 0, c.path))
        files.event_files.sort(key=_event_sort_key)
    for extra in log_files or ():
        p = Path(extra)
        if not p.is_file():
            raise RunReadError(f"{p}: log file not found")
        if p not in files.log_files:
            files.log_files.append(p)
    return files


def _inventory(folder: Path, step: int | None) -> CheckpointInfo:
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(dirnames)
        rel = Path(dirpath).relative_to(folder)
        for name in sorted(filenames):
            names.append(name if str(rel) == "." else f"{rel.as_posix()}/{name}")
    return CheckpointInfo(path=str(folder), step=step, files=names)
