"""Helpers shared by the renderers: counts, run facts, step spans, atomic writes. No torch here."""
from __future__ import annotations

import math
import os
import re
import secrets
from pathlib import Path
from typing import Any

from ..diagnosis import Diagnosis, Finding, Severity

# Control characters (C0 except tab/newline, DEL, C1) from logs must not reach a terminal raw.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: Any) -> str:
    """A user-data string safe to print: control characters (ANSI escapes, \\r) shown as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def counts(diag: Diagnosis) -> dict[Severity, int]:
    out = {s: 0 for s in (Severity.CRITICAL, Severity.WARNING, Severity.INFO)}
    for f in diag.findings:
        out[f.severity] += 1
    return out


def counts_text(diag: Diagnosis) -> str:
    return ", ".join(f"{n} {sev}" for sev, n in counts(diag).items())


def steps_text(f: Finding) -> str | None:
    if not f.steps:
        return None
    a, b = f.steps
    return str(a) if a == b else f"{a}-{b}"


def fmt_value(v: Any) -> str:
    """A summary value as text: floats with 4 significant digits, NaN/Inf spelled out."""
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items())
    return str(v)


def run_facts(run) -> dict[str, Any]:
    """What was read, for the summary line/section of every report."""
    df = run.scalars
    first = int(df["step"].min()) if not df.empty else None
    last = run.last_step
    return {
        "root": str(run.root),
        "steps": (first, last) if first is not None else None,
        "metrics": len(run.metrics),
        "points": run.n_points,
        "files_read": [str(f) for f in run.files_read],
        "checkpoints": len(run.checkpoints),
        "problems": [str(p) for p in run.problems],
    }


def run_line(run) -> str:
    """One line: ``steps 0-1000 · 12 metrics · 5,000 points · 3 files read · 2 checkpoints``."""
    facts = run_facts(run)
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
