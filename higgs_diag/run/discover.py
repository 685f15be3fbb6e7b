"""What files a run has. RUN_DIR may be an output_dir (checkpoint-*/ and runs/), one checkpoint folder,
a logging folder with only event files, or one trainer_state.json / event file.

Only regular files inside the run are handed to the readers: a folder that cannot be listed, a FIFO, device or
socket named like a run file, a dangling symlink or a symlink that leaves the run folder is refused with a read
problem (see :class:`Refused`), so that what could not be read is never silent."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..layout import (EVENT_FILE_MARK, OPTIMIZER, SCHEDULER, TRAINER_STATE, TRAINING_ARGS, checkpoint_step,
                      is_checkpoint_name, is_event_file, is_rng_state)
from ..limits import MAX_STEP, file_kind
from .model import CheckpointInfo, ReadProblem

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


class Refused(type(Path())):
    """A path discover will not read, and why (``refusal``, a ReadProblem): a folder it cannot list, a FIFO,
    device or socket, a dangling symlink, a symlink that leaves the run folder, a checkpoint folder whose step
    is out of range. Refused paths travel in ``RunFiles.trainer_states``: ``read_trainer_state`` (and
    ``read_event_file``) give their refusal as the read problem without opening anything, so every refusal
    reaches ``Run.problems`` (HD001) through the run loader as it is. They are also listed in
    ``RunFiles.problems``."""

    refusal: ReadProblem


def _refused(path, message: str, kind: str = "unreadable") -> Refused:
    r = Refused(path)
    r.refusal = ReadProblem(str(path), message, kind=kind, fatal=True)
    return r


def _event_sort_key(path: Path) -> tuple:
    # events.out.tfevents.<timestamp>.<host>.<pid>.<n>: order by timestamp, then the trailing counter.
    parts = path.name.split(EVENT_FILE_MARK, 1)[-1].split(".")
    head = parts[0] if parts else ""
    ts = float(head) if head.isdigit() and len(head) <= 20 else 0.0
    tail = parts[-1] if parts else ""
    n = int(tail) if tail.isdigit() and len(tail) <= 20 else 0
    return (ts, n, str(path))


@dataclass
class RunFiles:
    root: Path
    trainer_states: list[Path] = field(default_factory=list)  # (and the Refused paths, see Refused)
    event_files: list[Path] = field(default_factory=list)
    log_files: list[Path] = field(default_factory=list)
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    not_read: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    problems: list[ReadProblem] = field(default_factory=list)  # what discover refused (also as Refused paths)

    @property
    def empty(self) -> bool:
        return not (self.trainer_states or self.event_files or self.log_files or self.checkpoints)

    def refuse(self, path, message: str, kind: str = "unreadable") -> None:
        r = _refused(path, message, kind)
        self.problems.append(r.refusal)
        self.trainer_states.append(r)


def discover(path: str | os.PathLike, log_files: list[str | os.PathLike] | None = None) -> RunFiles:
    root = Path(path)
    try:
        os.lstat(root)
    except FileNotFoundError:
        raise RunReadError(f"{root}: no such file or directory") from None
    except OSError as e:
        raise RunReadError(f"{root}: cannot be examined ({e.strerror or e})") from None
    files = RunFiles(root=root)
    if not os.path.isdir(root):  # one file (a FIFO or device is refused by its reader, without blocking)
        if is_event_file(root.name):
            files.event_files.append(root)
        elif root.suffix in (".log", ".txt", ".out", ".err"):
            files.log_files.append(root)
        else:  # any other single file is taken as a trainer_state.json
            files.trainer_states.append(root)
    else:
        inside = _Inside(root)
        for here, dirs, entries in _walk(root, files):
            if is_checkpoint_name(here.name):
                step = checkpoint_step(here.name)
                if step is not None and step > MAX_STEP:
                    files.refuse(here, f"a checkpoint folder whose step is out of range (over {MAX_STEP:,}, "
                                       f"higgs_diag.limits.MAX_STEP): not inventoried", kind="out-of-range")
                else:
                    files.checkpoints.append(_inventory(here, step, files))
            for entry in entries:
                name = entry.name
                target = (files.trainer_states if name == TRAINER_STATE else files.event_files if is_event_file(name)
                          else files.log_files if name.endswith(".log") else None)
                p = here / name
                if target is None:
                    if name in NOT_READ or is_rng_state(name):
                        files.not_read.append((str(p), NOT_READ.get(name, "RNG state (pickle), not needed")))
                    continue
                why = _not_regular(entry, inside)
                if why:
                    files.refuse(p, why)
                else:
                    target.append(p)
        files.checkpoints.sort(key=lambda c: (c.step is None, c.step or 0, c.path))
        files.event_files.sort(key=_event_sort_key)
    for extra in log_files or ():
        p = Path(extra)
        if not p.is_file():
            if os.path.lexists(p):
                try:
                    what = file_kind(os.stat(p).st_mode)
                except OSError as e:
                    what = f"cannot be examined ({e.strerror or e})"
                raise RunReadError(f"{p}: {what}, not a regular file: not read as a log")
            raise RunReadError(f"{p}: log file not found")
        if p not in files.log_files:
            files.log_files.append(p)
    return files


class _Inside:
    """Whether a symlink's target stays in the run folder."""

    def __init__(self, root: Path):
        self.root = os.path.realpath(root)

    def __call__(self, path: str) -> tuple[bool, str]:
        target = os.path.realpath(path)
        try:
            return os.path.commonpath([self.root, target]) == self.root, target
        except ValueError:  # another drive
            return False, target


def _not_regular(entry: os.DirEntry, inside: _Inside) -> str | None:
    """Why discover will not hand this directory entry to a reader, or None for a regular file in the run."""
    try:
        if entry.is_symlink():
            ok, target = inside(entry.path)
            if not ok:
                return f"a symlink to {target}, outside the run folder: not read"
        st = entry.stat()  # follows a symlink
    except OSError as e:
        if entry.is_symlink():
            return f"a dangling symlink ({e.strerror or e}): not read"
        return f"cannot be examined ({e.strerror or e}): not read"
    if not stat.S_ISREG(st.st_mode):
        return f"{file_kind(st.st_mode)}, not a regular file: not read"
    return None


def _walk(top: Path, files: RunFiles, skip=_SKIP_DIRS):
    """``(folder, subfolder entries, file entries)`` top-down, sorted by name (like ``os.walk``, symlinked
    folders not followed); a folder that cannot be listed is refused (``files.refuse``) with the reason."""
    stack = [top]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except OSError as e:
            files.refuse(here, f"folder cannot be listed ({e.strerror or e}): the files in it were not read")
            continue
        dirs, others = [], []
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                if e.name not in skip:
                    dirs.append(e)
            elif not _is_dir_link(e):  # a symlinked folder is not followed (as os.walk)
                others.append(e)
        dirs.sort(key=lambda e: e.name)
        others.sort(key=lambda e: e.name)
        yield here, dirs, others
        stack.extend(here / d.name for d in reversed(dirs))


def _is_dir_link(e: os.DirEntry) -> bool:
    try:
        return e.is_symlink() and e.is_dir()
    except OSError:
        return False


def _inventory(folder: Path, step: int | None, files: RunFiles) -> CheckpointInfo:
    """The files of a checkpoint folder (a subfolder that cannot be listed is reported by the run's walk)."""
    names: list[str] = []
    for here, _dirs, entries in _walk(folder, RunFiles(folder), skip=()):
        rel = here.relative_to(folder)
        for e in entries:
            names.append(e.name if str(rel) == "." else f"{rel.as_posix()}/{e.name}")
    return CheckpointInfo(path=str(folder), step=step, files=names)
