"""Checks on the input files themselves: what could not be read, and what was deliberately not read."""
from __future__ import annotations

from ..diagnosis import Severity
from . import check, finding

# Data that was there and could not be read is a warning (the diagnosis is missing part of the run); an LFS
# pointer, an empty log_history or a file that is not a Trainer state is only information.
_SEVERITY = {"truncated": Severity.WARNING, "crc": Severity.WARNING, "unreadable": Severity.WARNING}


@check("HD001", "unreadable-input", rank=90)
def unreadable_input(run, t):
    """A run file could not be read completely.

    What it detects: a TensorBoard event file cut off mid-record or with a CRC mismatch, a cut-off or
    invalid `trainer_state.json`, a Git LFS pointer in place of the real file, JSON that is not a
    Trainer state, an empty `log_history`. Everything before the damage is still used.

    Why it happens: the training process was killed while writing (out of memory, pre-emption, a full
    disk), the file was copied before the writer flushed, or the repository stores the file with Git
    LFS and the checkout did not fetch it.

    Example: `runs/May01/events.out.tfevents.1714.host.1.0 at byte 48213: truncated record (needs 52
    bytes, 17 left); the 1,203 records before it were used`.

    Fix: for a truncated last record, nothing: the points before it were used. For an LFS pointer run
    `git lfs pull`. For a file that is not a Trainer state, point higgs-diag at the run's `output_dir`.
    """
    for p in run.problems:
        sev = _SEVERITY.get(p.kind, Severity.INFO)
        where = f" at byte {p.offset}" if p.offset is not None else ""
        yield finding(
            sev,
            f"{_name(p.file)}: {p.message.split(';')[0]}",
            evidence=[f"{p.file}{where}: {p.message}"],
            explanation="What could be read before the damage was used; the rest of the report is based on it."
            if not p.fatal else "This file contributed nothing to the diagnosis.",
            fix=_FIX.get(p.kind, "Check the file; point higgs-diag at the run's output_dir."),
        )


_FIX = {
    "lfs-pointer": "Run `git lfs pull` in the repository, then analyze again.",
    "truncated": "Nothing to do if the run was killed: the points before the cut were used. If the run is "
                 "still writing, analyze again when it has flushed.",
    "crc": "The record was skipped. A CRC error in the middle of a file means the copy is corrupt: copy it again.",
    "not-trainer-state": "This is not a file the HF Trainer wrote; point higgs-diag at the run's output_dir.",
    "non-numeric": "Nothing to do: these values cannot be plotted or checked; the numbers around them were used.",
    "empty": "Nothing was logged yet; analyze the run after it has logged (logging_steps) at least once.",
}


def _name(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


@check("HD002", "config-mismatch", rank=95)
def training_args_not_read(run, t):
    """TrainingArguments unknown: only the pickled `training_args.bin` holds them.

    What it detects: the run has `training_args.bin` but no `args` text summary in its TensorBoard
    events, so the checks that compare the logs with the configuration (best-model metric, eval and
    save steps, warmup, NaN filter) cannot run.

    Why it happens: `report_to` did not include `tensorboard`, or the logging folder was not copied
    with the run. higgs-diag never unpickles `training_args.bin`: unpickling executes code from the file.

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
                  f"no `args` text summary in {sum(1 for f in run.files_read if 'tfevents' in f)} event file(s)"],
        explanation="Checks that compare the logs with the configuration were skipped. Unpickling "
                    "training_args.bin would execute code stored in the file, so higgs-diag does not do it.",
        fix='Train with report_to=["tensorboard"] so the arguments are logged as JSON, or copy the runs/ folder '
            "with the checkpoints.",
    )
