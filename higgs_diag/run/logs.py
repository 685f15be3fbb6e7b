"""Console logs: the messages that explain a failed run (tracebacks, the eval_loss KeyError, ...)."""
from __future__ import annotations

import re
from pathlib import Path

from .model import LogEvent, ReadProblem

# (kind, pattern): the first pattern that matches a line names its kind.
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("metric-keyerror", re.compile(r"The `metric_for_best_model` training argument is set to '([^']*)', which is not "
                                   r"found in the evaluation metrics")),
    ("no-loss", re.compile(r"The model did not return a loss from the inputs")),
    ("early-stopping-disabled", re.compile(r"early stopping is disabled")),
    ("newly-initialized", re.compile(r"newly initialized|were not initialized from the model checkpoint")),
    ("rng-unpickling", re.compile(r"Weights only load failed")),
    ("training-completed", re.compile(r"^Training completed\.")),
]
TRACEBACK_START = "Traceback (most recent call last):"
# the exception line that ends a traceback: "ValueError: ...", "torch.OutOfMemoryError: ...", "KeyboardInterrupt"
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(: .*|:)?$")
_NOT_EXC = ("During handling of the above exception", "The above exception was the direct cause")
MAX_LINE = 2000  # characters of one line kept in evidence


def read_log(path: str | Path) -> tuple[list[LogEvent], list[ReadProblem]]:
    p = Path(path)
    name = str(p)
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except OSError as e:
        return [], [ReadProblem(name, f"cannot read log: {e.strerror or e}", fatal=True)]
    text = data.decode("utf-8", errors="replace")
    events: list[LogEvent] = []
    in_tb = False
    tb_start = 0
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        for kind, pat in PATTERNS:
            if pat.search(s):
                events.append(LogEvent(kind, name, no, s[:MAX_LINE]))
                break
        if s.startswith(TRACEBACK_START):
            in_tb, tb_start = True, no
            continue
        if in_tb and s and not line.startswith((" ", "\t")) and not s.startswith(_NOT_EXC) and _EXC_LINE.match(s):
            events.append(LogEvent("traceback", name, tb_start, s[:MAX_LINE]))
            in_tb = False
    return events, []
