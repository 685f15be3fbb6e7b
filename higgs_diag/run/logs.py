"""Console logs: one streaming pass over a ``train.log`` gives the messages that explain a failed run
(tracebacks, the eval_loss KeyError, ...), the series the console printed (``source="console"``) and what the
log says about the end of training (:class:`~higgs_diag.run.model.ConsoleInfo`).

What is read, and where each value's step comes from, is declared once in :mod:`higgs_diag.run.console`
(``FORMATS``). The reader is linear and memory-bounded: the file is streamed in 1 MiB chunks and split at every
carriage return and newline (a tqdm line holds many ``\\r``-separated bar updates; a log dict or a traceback may
follow a bar on the same line), a segment keeps at most ``MAX_SEGMENT_BYTES``, and a file that is not a regular
file (a FIFO would block) or is larger than ``MAX_LOG_BYTES`` is not read: a ReadProblem says so.
"""
from __future__ import annotations

import re
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .. import limits
from . import console as C
from .model import ConsoleInfo, LogEvent, ReadProblem

CHUNK = 1 << 20
_SEP = re.compile(rb"\r\n|\r|\n")
_PENDING_MAX = 4096  # component prints kept per metric while a step is in progress (gradient accumulation)
_PENDING_DICTS_MAX = 64  # printed dicts waiting for the bar that gives their step
_FRAMES_MAX = 64  # frames kept per traceback
_EVENTS_PER_KIND = 500  # beyond, the last event of a kind replaces the previous last one
_NOISE_FRAMES = {"_call_impl", "_wrapped_call_impl"}  # torch's nn.Module plumbing, left out of the evidence
MAX_LINE = C.MAX_LINE


@dataclass
class ConsoleResult:
    events: list[LogEvent] = field(default_factory=list)
    problems: list[ReadProblem] = field(default_factory=list)
    info: ConsoleInfo | None = None
    steps: array = field(default_factory=lambda: array("q"))
    metric_codes: array = field(default_factory=lambda: array("q"))  # per point, an index into metric_names
    metric_names: list[str] = field(default_factory=list)
    values: array = field(default_factory=lambda: array("d"))

    @property
    def metrics(self) -> list[str]:
        """The metric name of every point."""
        return [self.metric_names[i] for i in self.metric_codes]


def read_log(path: str | Path) -> tuple[list[LogEvent], list[ReadProblem]]:
    """The messages of a console log and what kept it from being read (see :func:`read_console`)."""
    res = read_console(path)
    return res.events, res.problems


def read_console(path: str | Path) -> ConsoleResult:
    p = Path(path)
    name = str(p)
    fh, problem = _open_regular(p, name)
    if fh is None:
        return ConsoleResult(problems=[problem])
    reader = _Reader(name)
    try:
        with fh:
            for line_no, first, raw, cut in segments(fh):
                reader.feed(line_no, first, raw, cut)
    except OSError as e:
        reader.finish()
        res = reader.result()
        res.problems.append(ReadProblem(name, f"read error after line {res.info.lines}: {e.strerror or e}; "
                                              f"what came before was used", kind="truncated"))
        return res
    reader.finish()
    return reader.result()


def _open_regular(p: Path, name: str):
    """(binary file object, None), or (None, ReadProblem) for what must not be read: a path discover refused,
    anything but a regular file (``limits.open_regular`` refuses a FIFO without blocking), a file larger than
    ``MAX_LOG_BYTES``."""
    refusal = getattr(p, "refusal", None)  # a path discover would not read (see discover.Refused)
    if refusal is not None:
        return None, refusal
    try:
        fh, size = limits.open_regular(p, what="console log")
    except limits.NotReadable as e:
        return None, ReadProblem(name, str(e), kind="unreadable", fatal=True)
    if size > C.MAX_LOG_BYTES:
        fh.close()
        return None, ReadProblem(name, f"{size:,} bytes, over the {C.MAX_LOG_BYTES:,}-byte limit for a console log "
                                       f"(higgs_diag.run.console.MAX_LOG_BYTES): not read; pass the part of the "
                                       f"log that matters", kind="unreadable", fatal=True)
    return fh, None


def segments(fh, limit: int = C.MAX_SEGMENT_BYTES):
    """Every ``\\r``- or newline-separated segment of a binary stream: ``(line number (1-based), first segment of
    its line, bytes (at most ``limit``), cut)``. Streams in ``CHUNK``-byte reads."""
    line_no, first = 1, True
    buf = bytearray()  # the start of a segment that continues in the next chunk
    cut = False
    for chunk in iter(lambda: fh.read(CHUNK), b""):
        pos = 0
        for m in _SEP.finditer(chunk):
            start = m.start()
            if buf or start - pos > limit:
                room = limit - len(buf)
                piece = chunk[pos:start]
                if len(piece) > room:
                    piece, cut = piece[:max(room, 0)], True
                seg = bytes(buf + piece)
                buf.clear()
            else:
                seg = chunk[pos:start]
            yield line_no, first, seg, cut
            cut = False
            if chunk[start] == 13 and m.end() - start == 1:  # a lone carriage return: same line
                first = False
            else:
                line_no, first = line_no + 1, True
            pos = m.end()
        piece = chunk[pos:]
        room = limit - len(buf)
        if len(piece) > room:
            piece, cut = piece[:max(room, 0)], True
        buf += piece
    if buf or cut:
        yield line_no, first, bytes(buf), cut


class _Traceback:
    __slots__ = ("start", "frames")

    def __init__(self, start: int):
        self.start = start
        self.frames: deque = deque(maxlen=_FRAMES_MAX)  # (file, line, function)


class _Reader:
    """The state of one pass. Steps are tracked on rank 0 (and unprefixed lines) only."""

    def __init__(self, name: str):
        self.name = name
        self.info = ConsoleInfo(file=name)
        self.events: list[LogEvent] = []
        self._last_of_kind: dict[str, int] = {}
        self._n_of_kind: dict[str, int] = {}
        self.steps, self.values, self.metric_ids = array("q"), array("d"), array("q")
        self.metric_names: list[str] = []
        self._metric_index: dict[str, int] = {}
        self.rank: int | None = None
        self.ranks: set[int] = set()
        self._line = 0
        self._last: tuple[str, int | None, int] | None = None  # the last non-empty segment: text, rank, line
        self.tb: dict[int | None, _Traceback] = {}
        # the current training session (rank 0)
        self.total: int | None = None  # the Trainer bar's total
        self.cur: int | None = None  # the last step the Trainer bar showed
        self.restart = False  # a crash or "Running training" since: another bar total starts a new session
        self.in_eval = False
        self.pending: dict[str, deque] = {}  # component prints of the step in progress
        self.pending_dicts: list[dict[str, float]] = []
        self.comp_rows: dict[str, int] = {}  # component rows placed at self.comp_step (a dict of that step wins)
        self.comp_step: int | None = None
        self.explicit: int | None = None  # the last `Step N` line
        self.acc: dict[str, list[float]] = {}  # components at the explicit step: [sum, count]
        self.acc_step: int | None = None

    # ---- output ------------------------------------------------------------------------------------------
    def _put(self, step: int, metric: str, value: float) -> int:
        idx = self._metric_index.get(metric)
        if idx is None:
            idx = self._metric_index[metric] = len(self.metric_names)
            self.metric_names.append(metric)
        self.steps.append(int(step))
        self.metric_ids.append(idx)
        self.values.append(float(value))
        return len(self.steps) - 1

    def _event(self, kind: str, line: int, text: str, context: tuple[str, ...] = ()) -> None:
        ev = LogEvent(kind, self.name, line, text[:MAX_LINE], step=self.cur, rank=self.rank, context=context)
        n = self._n_of_kind.get(kind, 0)
        self._n_of_kind[kind] = n + 1
        if n >= _EVENTS_PER_KIND:  # keep the first ones and the latest
            self.events[self._last_of_kind[kind]] = ev
            return
        self._last_of_kind[kind] = len(self.events)
        self.events.append(ev)

    def result(self) -> ConsoleResult:
        names = self.metric_names
        self.info.lines = self._line
        if self._last is not None:
            text, rank, no = self._last
            prefix = f"[rank{rank}]: " if rank is not None else ""
            self.info.last_line, self.info.last_line_no = (prefix + text)[:MAX_LINE], no
        self.info.ranks = tuple(sorted(self.ranks))
        self.info.points = len(self.steps)
        return ConsoleResult(events=self.events, info=self.info, steps=self.steps, metric_codes=self.metric_ids,
                             metric_names=list(names), values=self.values)

    # ---- one segment -------------------------------------------------------------------------------------
    def feed(self, line_no: int, first: bool, raw: bytes, cut: bool) -> None:
        self._line = line_no
        if cut:
            self.info.cut_segments += 1
        if first:
            self.rank = None  # until a prefix says otherwise (read by _segment)
        self._segment(raw.decode("utf-8", errors="replace"), line_no)

    def _segment(self, text: str, line_no: int) -> None:
        if text[:1] == "[":  # another rank's output can follow a bar on the same line (tqdm writes no newline)
            m = C.RANK.match(text)
            if m:
                self.rank = int(m.group(1))
                self.ranks.add(self.rank)
                text = text[m.end():]
        plain = C.ANSI.sub("", text) if "\x1b" in text else text
        s = plain.strip()
        if not s:
            return
        self._last = (s, self.rank, line_no)
        if self.pending_dicts and self.rank in (None, 0) and "%|" not in text and "{'" not in text:
            self._flush_dicts()  # no bar redrawn right after the dict (torchrun's tee): the bar before it counts
        if self.tb:
            tb = self.tb.get(self.rank)
            if tb is not None and self._traceback_line(tb, plain, line_no):
                return
        if "%|" in text:
            bar = C.BAR.search(text)
            if bar is not None:
                if self.rank in (None, 0):
                    desc = C.ANSI.sub("", text[:bar.start()]).strip().rstrip(":").strip()
                    nested = text[bar.end():].startswith(C.CURSOR_UP)  # the bar one row lower: evaluation
                    self._bar(desc, int(bar.group("n")), int(bar.group("total")), nested, line_no)
                self._segment(text[bar.end():], line_no)  # a dict, a print or a traceback may follow the bar
                return
        if not C.QUICK.search(s):
            return
        if C.MESSAGE_ANY.search(s):
            kind = next(kind for kind, pat in C.MESSAGES if pat.search(s))
            self._event(kind, line_no, s)
        if C.TRACEBACK_START in s:
            self.tb[self.rank] = _Traceback(line_no)
            return
        if self.rank in (None, 0):
            self._rank0(plain, s, line_no)

    def _traceback_line(self, tb: _Traceback, text: str, line_no: int) -> bool:
        """Whether the segment belongs to the open traceback (frames, code, chained headers); ends it at the
        exception line, which is then read as a message too (returns False)."""
        s = text.strip()
        if not s or C.TRACEBACK_START in s:
            if s:  # a chained traceback: its frames are the ones that matter
                tb.frames.clear()
            return True
        fm = C.FRAME.match(text)
        if fm:
            tb.frames.append((fm.group(1), int(fm.group(2)), fm.group(3)))
            return True
        if C.BAR.search(text):
            return False
        if text[:1] in (" ", "\t") or s.startswith(C.NOT_EXC):
            return True
        if C.EXC_LINE.match(s):
            self._exception(tb, s, line_no)
            del self.tb[self.rank]
        return False

    def _exception(self, tb: _Traceback, s: str, line_no: int) -> None:
        frames = [f for f in tb.frames if f[2] not in _NOISE_FRAMES]
        context = tuple(f"{f[0]}:{f[1]} in {f[2]}" for f in frames[-3:])
        funcs = {f[2] for f in tb.frames}
        self._event("traceback", tb.start, s, context)
        for f in C.EXCEPTIONS:
            if f.pattern.match(s) and (not f.requires_frame or f.requires_frame in funcs):
                self._event(f.name, line_no, s, context)
        self.restart = True  # the process died: a later bar belongs to another process

    def _rank0(self, plain: str, s: str, line_no: int) -> None:
        """Values and markers, read on rank 0 only."""
        if "{'" in plain:
            d = C.parse_log_dict(plain)
            if d is not None:
                self._log_dict(d, s, line_no)
                return
        comp = C.component(plain)
        if comp is not None:
            self._component(*comp)
            return
        if ("Step" in plain or "Val" in plain) and self._step_line(plain, line_no):
            return
        if C.MARKER_ANY.search(plain):
            self._marker(plain, s, line_no)

    def _marker(self, plain: str, s: str, line_no: int) -> None:
        if C.TRAINING_START.search(plain):
            self._new_session(line_no)
        elif C.EVALUATION_START.search(plain):
            self._enter_eval()
        elif C.TRAINING_COMPLETED.search(plain):
            self._completed(line_no, s)
        else:
            m = C.TOTAL_STEPS.search(plain)
            if m:
                self.info.max_steps = int(m.group(1).replace(",", ""))
                self.info.max_steps_from = f"line {line_no}: Total optimization steps"
                return
            m = C.RESUME_STEP.search(plain)
            if m:
                self._progress(int(m.group(1)), line_no)

    # ---- sessions and steps ------------------------------------------------------------------------------
    def _new_session(self, line_no: int) -> None:
        self._flush_dicts()
        self._flush_acc()
        self.pending.clear()
        self.total = self.cur = self.explicit = None
        self.in_eval = self.restart = False
        info = self.info
        info.sessions += 1
        info.session_start_line = line_no
        info.completed, info.completed_line = False, None
        info.max_steps = info.last_step = info.last_step_line = None
        info.max_steps_from = ""

    def _progress(self, step: int, line_no: int) -> None:
        if self.info.last_step is None or step >= self.info.last_step:
            self.info.last_step, self.info.last_step_line = step, line_no

    def _completed(self, line_no: int, s: str) -> None:
        if self.info.sessions == 0:
            self.info.sessions = 1
        self.info.completed, self.info.completed_line = True, line_no
        self._event("training-completed", line_no, s)

    def _bar(self, desc: str, n: int, total: int, nested: bool, line_no: int) -> None:
        if desc:  # a custom loop's own bar (over micro-batches, per epoch): not the Trainer's step counter
            return
        if nested:  # the evaluation bar: its forwards are not training values; at n == total it is done
            self._eval_bar(n, total)
            return
        if self.total is None:  # the first Trainer bar of the log, or after a crash or a finished session
            if self.info.sessions == 0 or self.restart or self.info.completed:
                self._new_session(line_no)
        elif total != self.total:
            if not self.restart:  # another total in the same process: an evaluation bar at position 0
                self._eval_bar(n, total)
                return
            self._new_session(line_no)
        elif self.cur is not None and n < self.cur:  # the count went back: a new process, same max_steps
            self._new_session(line_no)
        self.total = total
        if self.info.max_steps != total:
            self.info.max_steps, self.info.max_steps_from = total, f"the progress bar's total, line {line_no}"
        self._advance(n, line_no)

    def _advance(self, n: int, line_no: int) -> None:
        if self.cur is None:  # the bar's first draw, before the session's first forward
            self.pending.clear()
        elif n > self.cur:
            self._flush_components(n, n - self.cur)
        self.cur = n if self.cur is None else max(self.cur, n)
        self._progress(self.cur, line_no)
        self.in_eval = self.restart = False
        self._flush_dicts()

    def _eval_bar(self, n: int, total: int) -> None:
        if n < total:
            self._enter_eval()
        else:  # its last draw (and its close) comes after the last evaluation forward
            self.in_eval = False

    def _enter_eval(self) -> None:
        self.pending.clear()
        self.in_eval = True

    # ---- values ------------------------------------------------------------------------------------------
    def _log_dict(self, d: dict[str, float], s: str, line_no: int) -> None:
        if "train_runtime" in d:
            self._completed(line_no, s)
        if any(k.startswith("eval_") for k in d):  # printed when the evaluation is over: drop its forwards
            self.pending.clear()
            self.in_eval = False
        if self.total is None:  # no Trainer bar: the dict has no step (trainer_state/TensorBoard hold it)
            self.info.unplaced += 1
            return
        self.pending_dicts.append(d)
        if len(self.pending_dicts) > _PENDING_DICTS_MAX:
            self._flush_dicts()

    def _flush_dicts(self) -> None:
        if not self.pending_dicts:
            return
        step = self.cur
        if step is None:
            self.info.unplaced += len(self.pending_dicts)
        else:
            for d in self.pending_dicts:
                for k, v in d.items():
                    row = self.comp_rows.pop(k, None) if self.comp_step == step else None
                    if row is not None:  # the Trainer's logged value of that step wins over a printed component
                        self.values[row] = v
                    else:
                        self._put(step, k, v)
        self.pending_dicts.clear()

    def _component(self, metric: str, value: float) -> None:
        if self.in_eval:
            return
        if self.total is not None:
            dq = self.pending.get(metric)
            if dq is None:
                dq = self.pending[metric] = deque(maxlen=_PENDING_MAX)
            dq.append(value)
        elif self.explicit is not None:
            if self.acc_step != self.explicit:
                self._flush_acc()
                self.acc_step = self.explicit
            a = self.acc.setdefault(metric, [0.0, 0])
            a[0] += value
            a[1] += 1
        else:
            self.info.unplaced += 1

    def _flush_components(self, step: int, jump: int) -> None:
        """The forwards since the bar last moved: their mean (the last n // jump of them when tqdm skipped
        drawing steps) is the value of ``step``."""
        self.comp_rows = {}
        for metric, vals in self.pending.items():
            if not vals:
                continue
            per = max(1, len(vals) // max(jump, 1))
            tail = list(vals)[-per:]
            self.comp_rows[metric] = self._put(step, metric, sum(tail) / len(tail))
        self.comp_step = step
        self.pending.clear()

    def _flush_acc(self) -> None:
        if self.acc_step is not None:
            for metric, (total, n) in self.acc.items():
                self._put(self.acc_step, metric, total / n)
        self.acc.clear()
        self.acc_step = None

    def _step_line(self, plain: str, line_no: int) -> bool:
        m = C.STEP_LOSSES.search(plain)
        if m:
            step = int(m.group(1))
            self._explicit_step(step, line_no)
            for k, v in C.parse_step_losses(m.group(2)).items():
                self._put(step, k, v)
            return True
        m = C.VAL_LOSS.search(plain)
        if not m:
            return False
        if m.group(1):
            self._explicit_step(int(m.group(1)), line_no)
        step = int(m.group(1)) if m.group(1) else (self.explicit if self.explicit is not None else self.cur)
        if step is None:
            self.info.unplaced += 1
            return True
        for metric, g in (("eval_loss", 2), ("eval_text_loss", 3), ("eval_audio_loss", 4)):
            v = C.parse_value(m.group(g)) if m.group(g) else None
            if v is not None:
                self._put(step, metric, v)
        return True

    def _explicit_step(self, step: int, line_no: int) -> None:
        if self.acc_step is not None and self.acc_step != step:
            self._flush_acc()
        if self.total is None:  # no Trainer bar: these lines are the progress of a custom loop
            if self.explicit is not None and step < self.explicit:
                self._new_session(line_no)
            if self.info.sessions == 0:
                self.info.sessions, self.info.session_start_line = 1, line_no
            self._progress(step, line_no)
        self.explicit = step

    def finish(self) -> None:
        """End of file: dicts take the last step shown; the forwards of a step that never completed are dropped."""
        self._flush_dicts()
        self._flush_acc()
        self.pending.clear()
