"""Checks on the input files themselves: what could not be read, and what was deliberately not read.

The readers (``higgs_diag.run``) record a :class:`~higgs_diag.run.model.ReadProblem` of one ``kind`` for
each file they could not use fully; each kind has its own rule, because each has its own cause and fix:
damaged data (HD001), a Git LFS pointer (HD006), a file that is not a Trainer state (HD007), a file with
nothing logged yet (HD008), log values that are not numbers (HD009).
"""
from __future__ import annotations

from ..diagnosis import Severity
from . import check, finding

# the problem kinds with a rule of their own; every other kind (truncated, crc, unreadable) is damage: HD001
_OWN_RULE = ("lfs-pointer", "not-trainer-state", "empty", "non-numeric")


def _name(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def _problems(run, *kinds: str):
    return [p for p in run.problems if p.kind in kinds]


def _where(p) -> str:
    return f"{p.file}{f' at byte {p.offset}' if p.offset is not None else ''}: {p.message}"


@check("HD001", "unreadable-input", rank=90)
def unreadable_input(run, t):
    """A run file could not be read completely: it is cut off, corrupt or unreadable.

    What it detects: a TensorBoard event file cut off mid-record or with a CRC mismatch, a cut-off or
    invalid `trainer_state.json`, a file or console log that cannot be opened or decoded (warning: the
    diagnosis is missing part of the run). Everything before the damage is still used.

    Why it happens: the training process was killed while writing (out of memory, pre-emption, a full
    disk), the file was copied before the writer flushed, or the copy is corrupt (a CRC error in the
    middle of a file).

    Example: `runs/May01/events.out.tfevents.1714.host.1.0 at byte 48213: truncated record (needs 52
    bytes, 17 left); the 1,203 records before it were used`.

    Fix: for a cut-off last record of a killed run, nothing: the points before it were used. If the run
    is still writing, analyze again when it has flushed; for a CRC error in the middle of a file, copy
    the file again. The rest of the report is based on what could be read.
    """
    for p in run.problems:
        if p.kind in _OWN_RULE:
            continue
        yield finding(Severity.WARNING, f"{_name(p.file)} could not be read completely",
                      evidence=[_where(p), "nothing of this file was used" if p.fatal else
                                "what could be read before the damage was used"])


@check("HD006", "unreadable-input", rank=91)
def lfs_pointer(run, t):
    """A run file is a Git LFS pointer, not the file itself.

    What it detects: a `trainer_state.json` or event file whose content is a Git LFS pointer
    (`version https://git-lfs.github.com/spec/v1 ...`) (info; the file contributes nothing).

    Why it happens: the repository stores the file with Git LFS and the checkout or download did not
    fetch the LFS objects (`git clone` without `git lfs`, `GIT_LFS_SKIP_SMUDGE=1`, a download of the
    raw pointer).

    Example: `trainer_state.json: a Git LFS pointer of a 12965-byte file, not JSON`.

    Fix: run `git lfs pull` in the repository, then analyze again.
    """
    for p in _problems(run, "lfs-pointer"):
        yield finding(Severity.INFO, f"{_name(p.file)} is a Git LFS pointer, not the file", evidence=[_where(p)])


@check("HD007", "unreadable-input", rank=92)
def not_a_trainer_state(run, t):
    """A JSON file in the run is not a HF Trainer state.

    What it detects: a `trainer_state.json` that is valid JSON but has neither `log_history` nor
    `global_step` (info; the file contributes nothing).

    Why it happens: higgs-diag was pointed at a file another tool wrote under that name (a config, a
    metrics dump), or at a folder that is not a Trainer `output_dir`.

    Example: `trainer_state.json: not a HF Trainer state (list)`.

    Fix: point higgs-diag at the run's `output_dir` (or a `checkpoint-*` folder inside it), where the HF
    Trainer writes `trainer_state.json`.
    """
    for p in _problems(run, "not-trainer-state"):
        yield finding(Severity.INFO, f"{_name(p.file)} is not a HF Trainer state", evidence=[_where(p)])


@check("HD008", "unreadable-input", rank=93)
def nothing_logged_yet(run, t):
    """A run file holds nothing yet: an empty file, an event file never flushed, an empty `log_history`.

    What it detects: an empty `trainer_state.json`, an event file without a single record, or a Trainer
    state whose `log_history` is empty (info).

    Why it happens: the run had not logged yet when the file was written or copied: the first log comes
    after `logging_steps` optimizer steps, and TensorBoard's writer flushes every few records or
    seconds; a run that crashed before its first log leaves the same files.

    Example: `events.out.tfevents.1714.host.1.0: empty event file: the writer was created but never
    flushed a record`.

    Fix: analyze the run after it has logged (`logging_steps`) at least once; if it never does, look at
    its console log for the error that stopped it.
    """
    for p in _problems(run, "empty"):
        yield finding(Severity.INFO, f"{_name(p.file)} holds nothing logged yet", evidence=[_where(p)])


@check("HD009", "unreadable-input", rank=94)
def non_numeric_log_values(run, t):
    """Some `log_history` values are not numbers: they are left out of the curves and checks.

    What it detects: `log_history` values that are neither numbers nor numeric strings (text, lists,
    null or nested objects) (info).

    Why it happens: a callback or `compute_metrics` logged something other than a scalar (a list of
    per-class scores, a dict, a string); the Trainer writes it into `log_history` as is.

    Example: `trainer_state.json: 12 log_history value(s) are neither numbers nor numeric strings`.

    Fix: nothing to do: these values cannot be plotted or checked, the numbers around them were used.
    To have them checked, log one scalar per key.
    """
    for p in _problems(run, "non-numeric"):
        yield finding(Severity.INFO, f"{_name(p.file)} has log_history values that are not numbers",
                      evidence=[_where(p)])


@check("HD002", "config-mismatch", rank=95)
def training_args_not_read(run, t):
    """TrainingArguments unknown: only the pickled `training_args.bin` holds them.

    What it detects: the run has `training_args.bin` but no `args` text summary in its TensorBoard
    events, so the checks that compare the logs with the configuration (best-model metric, eval and
    save steps, warmup, NaN filter) cannot run.

    Why it happens: `report_to` did not include `tensorboard`, or the logging folder was not copied
    with the run. higgs-diag never unpickles `training_args.bin`: unpickling executes code from the
    file. The checks that compare the logs with the configuration were skipped.

    Example: `checkpoint-500/training_args.bin present; no args text summary in 0 event files`.

    Fix: train with `report_to=["tensorboard"]` (HF's TensorBoardCallback writes the arguments as JSON),
    or copy the `runs/` folder along with the checkpoints.
    """
    if run.args is not None:
        return
    bins = [f for f in run.other_files if f.endswith("training_args.bin")]
    if not bins:
        return
    yield finding(
        Severity.INFO,
        "TrainingArguments unknown: training_args.bin is a pickle and is not loaded",
        evidence=[f"{bins[-1]} present (not unpickled)",
                  f"no `args` text summary in {sum(1 for f in run.files_read if 'tfevents' in f)} event file(s)"])
