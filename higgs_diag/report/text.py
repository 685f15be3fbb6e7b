"""The terminal report: verdict header, then each finding ranked, most severe root cause first."""
from __future__ import annotations

import os
import textwrap
from typing import IO, Any

from ..diagnosis import Diagnosis, Severity
from ._common import clean, clean_name, counts_text, fmt_value, run_facts, run_line, span_text

WIDTH = 100

_RESET = "\x1b[0m"
_STYLES = {
    "critical": "\x1b[1;31m",  # bold red
    "warning": "\x1b[1;33m",  # bold yellow
    "info": "\x1b[36m",  # cyan
    "healthy": "\x1b[1;32m",  # bold green
    "bold": "\x1b[1m",
    "dim": "\x1b[2m",
}


def should_color(stream: IO[Any] | None) -> bool:
    """Colour for this stream? ``NO_COLOR`` (non-empty) disables, ``FORCE_COLOR`` (non-empty, not 0)
    enables, otherwise only when the stream is a terminal."""
    if os.environ.get("NO_COLOR"):
        return False
    force = os.environ.get("FORCE_COLOR")
    if force and force.strip().lower() not in ("0", "false", "no"):
        return True
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _wrap(label: str, text: str, indent: str = "  ") -> list[str]:
    """``label`` then ``text`` wrapped to WIDTH; the text's own line breaks are kept."""
    head = f"{indent}{label} "
    pad = " " * len(head)
    out: list[str] = []
    for i, para in enumerate(clean(text).splitlines() or [""]):
        first = head if i == 0 else pad
        if not para.strip():
            out.append(first.rstrip())
            continue
        out.extend(textwrap.wrap(para, WIDTH, initial_indent=first, subsequent_indent=pad,
                                 break_long_words=False, break_on_hyphens=False) or [first.rstrip()])
    return out


def render_text(diag: Diagnosis, color: bool = False) -> str:
    """A readable terminal report. ANSI colour only when ``color`` is True (see :func:`should_color`)."""

    def style(name: str, s: str) -> str:
        return f"{_STYLES[name]}{s}{_RESET}" if color else s

    verdict = diag.verdict
    lines = [
        f"{style('bold', 'higgs-diag')} {clean_name(diag.target)}",
        f"Verdict: {style(verdict, verdict.upper())} ({counts_text(diag)})",
    ]
    facts = run_facts(diag)
    if facts is not None:
        lines.append(f"Run: {clean(run_line(facts))}")
    elif diag.summary:
        simple = {k: v for k, v in diag.summary.items() if not isinstance(v, (dict, list, tuple))}
        if simple:
            lines.append("Summary: " + ", ".join(f"{clean(k)}={clean(fmt_value(v))}" for k, v in simple.items()))
    lines.append("")

    if not diag.at_or_above(Severity.WARNING):
        lines.append(style("healthy", "No problems found.")
                     + (" Notes:" if diag.findings else ""))
        lines.append("")

    for f in diag.findings:
        sev = str(f.severity)
        tag = style(sev, f"[{sev.upper()}]")
        lines.append(f"{tag} {style('bold', clean(f.code))} {clean(f.category)}: {clean(f.title)}")
        for ev in f.evidence:
            ev_lines = clean(ev).splitlines() or [""]
            lines.append(f"    - {ev_lines[0]}")
            lines.extend(f"      {x}" for x in ev_lines[1:])
        if f.explanation:
            lines.extend(_wrap(style("dim", "Why:") if color else "Why:", f.explanation))
        if f.fix:
            lines.extend(_wrap(style("dim", "Fix:") if color else "Fix:", f.fix))
        span = span_text(f.steps)
        if span:
            lines.append(f"  Steps: {span}")
        if f.caused_by:
            lines.append(f"  Caused by: {clean(f.caused_by)}")
        lines.append("")

    return "\n".join(lines).rstrip("\n") + "\n"
