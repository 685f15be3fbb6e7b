"""Helpers shared by the renderers: counts, run facts, step spans, atomic writes. No torch here."""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

from ..diagnosis import Diagnosis, Severity
from ..formatting import clean as _clean_controls
from ..formatting import fmt_value, span_text  # noqa: F401  (the renderers' shared helpers)

# What no report may carry raw, on any channel: lone surrogates (a file name's undecodable bytes, which no UTF-8
# stream can encode) and the Unicode line/paragraph separators (they split a line like a newline).
_UNSAFE = re.compile("[\u2028\u2029\ud800-\udfff]")
# ... and, on top of formatting.clean's control characters, for a name on one line: newline, tab, CR.
_LINE_BREAKS = re.compile(r"[\t\n\r]")
_ANY_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    o = ord(m.group())
    if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogateescape of the byte o - 0xDC00: show that byte
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}"


def clean(text: Any) -> str:
    """User data safe to print on any channel: control characters (ANSI escapes, BEL, \\r), lone surrogates
    and line separators shown as ``\\xNN`` / ``\\uNNNN``; tab and newline kept (see :func:`clean_name`)."""
    return _clean_controls(_UNSAFE.sub(_escape, str(text)))


def clean_name(text: Any) -> str:
    """A file or folder name on one line: :func:`clean`, newline, tab and CR escaped too."""
    return _LINE_BREAKS.sub(_escape, clean(text))


def safe_output(text: str) -> str:
    """The last pass over a whole rendered report (no ANSI colour in it): any control character but tab and
    newline, any lone surrogate or line separator left is escaped. A no-op when every value went through
    :func:`clean`."""
    return _ANY_CONTROL.sub(lambda m: m.group() if m.group() in "\t\n" else _escape(m), text)

def counts(diag: Diagnosis) -> dict[Severity, int]:
    out = {s: 0 for s in (Severity.CRITICAL, Severity.WARNING, Severity.INFO)}
    for f in diag.findings:
        out[f.severity] += 1
    return out


def counts_text(diag: Diagnosis) -> str:
    return ", ".join(f"{n} {sev}" for sev, n in counts(diag).items())


def run_facts(diag: Diagnosis) -> dict[str, Any] | None:
    """What was read, from the Diagnosis's summary (computed once by ``higgs_diag.api.summarize``); None for a
    report without a run (a replay of batch files alone)."""
    sm = diag.summary or {}
    if "n_points" not in sm:
        return None
    first, last = sm.get("first_step"), sm.get("steps")
    return {
        "root": clean_name(diag.target),
        "steps": (first, last) if first is not None else None,
        "metrics": len(sm.get("metrics") or []),
        "metric_names": list(sm.get("metrics") or []),
        "points": sm.get("n_points") or 0,
        "files_read": [clean_name(f) for f in sm.get("files_read") or []],
        "checkpoints": len(sm.get("checkpoints") or []),
        "problems": [clean(p) for p in sm.get("problems") or []],
    }


def run_line(facts: dict[str, Any]) -> str:
    """One line: ``steps 0-1000 · 12 metrics · 5,000 points · 3 files read · 2 checkpoints``."""
    parts = []
    if facts["steps"]:
        a, b = facts["steps"]
        parts.append(f"steps {a}-{b}")
    else:
        parts.append("no scalars")
    parts.append(f"{facts['metrics']} metrics read")
    parts.append(f"{facts['points']:,} points")
    n = len(facts["files_read"])
    parts.append(f"{n} file{'s' if n != 1 else ''} read")
    if facts["checkpoints"]:
        parts.append(f"{facts['checkpoints']} checkpoint{'s' if facts['checkpoints'] != 1 else ''}")
    if facts["problems"]:
        k = len(facts["problems"])
        parts.append(f"{k} read problem{'s' if k != 1 else ''}")
    return " · ".join(parts)


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``: a reader never
    sees a half-written report, and a failure leaves no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    # os.open with mode 0o666 (not mkstemp's 0o600) so the report gets the user's usual permissions.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
