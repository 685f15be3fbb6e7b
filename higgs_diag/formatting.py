"""How values read in every report: one set of formatting helpers for rules, replay and renderers."""
from __future__ import annotations

import math
import re
from typing import Any

# Control characters (C0 except tab/newline, DEL, C1) from logs must not reach a terminal raw.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: Any) -> str:
    """A user-data string safe to print: control characters (ANSI escapes, \\r) shown as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def fmt(v: Any) -> str:
    """A number as a user reads it in a log: 4 significant digits, ``NaN`` / ``Inf`` / ``-Inf`` spelled out."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v)
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        return str(v)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    if x == 0:
        return "0.0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:.4g}"


def fmt_value(v: Any) -> str:
    """A summary value as text: floats via :func:`fmt`, lists and dicts flattened, the rest as ``str``."""
    if isinstance(v, float):
        return fmt(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items())
    return str(v)


def steps_text(first: int, last: int) -> str:
    """``step 20`` or ``steps 20-40``."""
    return f"step {first}" if first == last else f"steps {first}-{last}"


def steps_list(steps, limit: int = 6) -> str:
    """``10, 20, 30`` or ``10, 20, ..., (41 in all)``: the steps a finding lists as evidence."""
    steps = [int(s) for s in steps]
    if len(steps) <= limit:
        return ", ".join(str(s) for s in steps)
    return ", ".join(str(s) for s in steps[:limit]) + f", ... ({len(steps)} in all)"


def span_text(steps: tuple[int, int] | None) -> str | None:
    """A finding's step span as ``20`` or ``20-40`` (None without one)."""
    if not steps:
        return None
    a, b = steps
    return str(a) if a == b else f"{a}-{b}"
