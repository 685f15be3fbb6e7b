"""The GitHub-flavoured Markdown report (for a PR comment, an issue, a notebook).

Every string from the diagnosis or the logs is user data: it is escaped so it cannot open a heading,
a list, a link, raw HTML or a code span, nor break a table row (pipes, newlines).
"""
from __future__ import annotations

import re
from urllib.parse import quote
from typing import Any

from ..diagnosis import Diagnosis, Severity
from ._common import clean, clean_name, counts_text, fmt_value, run_facts, safe_output, span_text

_INLINE = re.compile(r"([\\`*_\[\]<>|~&!#{}])")
# At the start of a line these would open a list item ("- x", "1. x") or a setext underline ("==").
_LINE_START = re.compile(r"^(\s*)([-+](?=\s|$)|\d{1,9}(?=[.)](?:\s|$))|=+\s*$)")


def md_text(text: Any, hard_breaks: bool = False) -> str:
    """Escape ``text`` for Markdown inline content. Newlines become spaces, or hard line breaks when
    ``hard_breaks`` (for explanations and fixes)."""
    lines = []
    for line in clean(text).splitlines() or [""]:
        line = _INLINE.sub(r"\\\1", line.strip())
        m = _LINE_START.match(line)
        if m:  # "- x", "+ x", "1. x" at the start of a line would start a list or a heading
            pos = m.end(2) if m.group(2).isdigit() else m.start(2)
            line = line[:pos] + "\\" + line[pos:]
        lines.append(line)
    if hard_breaks:
        return "\\\n".join(x for x in lines if x) if any(lines) else ""
    return " ".join(x for x in lines if x)


def md_code(text: Any, in_table: bool = False) -> str:
    """``text`` as an inline code span that survives backticks in the data (a longer fence) and, in a
    table cell, pipes (GFM needs ``\\|`` even inside code)."""
    s = " ".join(clean(text).splitlines())
    longest = max((len(r) for r in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    if s.startswith(("`", " ")) or s.endswith(("`", " ")):
        s = f" {s} "
    if in_table:
        s = s.replace("|", "\\|")
    return f"{fence}{s}{fence}"


def _cell(text: Any) -> str:
    return md_text(text) or " "


def render_markdown(diag: Diagnosis, plots: dict[str, str] | None = None) -> str:
    """The report as GitHub-flavoured Markdown. ``plots``: ``{name: relative path to a PNG}``."""
    out: list[str] = []
    verdict = diag.verdict
    out.append("# higgs-diag report")
    out.append("")
    out.append(f"**Target:** {md_code(clean_name(diag.target))}  ")
    out.append(f"**Verdict:** **{verdict.upper()}** ({counts_text(diag)})  ")
    out.append(f"**Tool version:** {md_code(diag.tool_version)}")
    out.append("")

    if not diag.at_or_above(Severity.WARNING):
        out.append("> No problems found." + (" Notes below." if diag.findings else ""))
        out.append("")

    if diag.findings:
        out.append("## Findings")
        out.append("")
        out.append("| # | Severity | Code | Category | Title | Steps |")
        out.append("|---:|---|---|---|---|---|")
        for i, f in enumerate(diag.findings, 1):
            out.append(f"| {i} | {str(f.severity).upper()} | {md_code(f.code, True)} | {md_code(f.category, True)} "
                       f"| {_cell(f.title)} | {_cell(span_text(f.steps) or '')} |")
        out.append("")
        for i, f in enumerate(diag.findings, 1):
            out.append(f"### {i}. [{str(f.severity).upper()}] {md_text(f.code)} {md_text(f.category)}: {md_text(f.title)}")
            out.append("")
            if f.evidence:
                out.append("**Evidence:**")
                out.append("")
                out.extend(f"- {md_text(ev) or ' '}" for ev in f.evidence)
                out.append("")
            for label, value in (("Why", f.explanation), ("Fix", f.fix)):
                if value:
                    out.append(f"**{label}:** {md_text(value, hard_breaks=True)}")
                    out.append("")
            span = span_text(f.steps)
            extra = []
            if span:
                extra.append(f"**Steps:** {span}")
            if f.caused_by:
                extra.append(f"**Caused by:** {md_code(f.caused_by)}")
            if extra:
                out.append(" · ".join(extra))
                out.append("")

    if plots:
        out.append("## Plots")
        out.append("")
        for name, path in plots.items():
            target = quote(str(path).replace("\\", "/"), safe="/")
            out.append(f"![{md_text(name)}]({target})")
            out.append("")

    facts = run_facts(diag)
    if facts is not None:
        out.append("## Run")
        out.append("")
        out.append("| | |")
        out.append("|---|---|")
        out.append(f"| Root | {md_code(facts['root'], True)} |")
        if facts["steps"]:
            out.append(f"| Steps | {facts['steps'][0]}-{facts['steps'][1]} |")
        out.append(f"| Metrics read | {facts['metrics']} |")
        out.append(f"| Scalar points | {facts['points']:,} |")
        out.append(f"| Checkpoints | {facts['checkpoints']} |")
        out.append("")
        if facts["files_read"]:
            out.append("**Files read:**")
            out.append("")
            out.extend(f"- {md_code(p)}" for p in facts["files_read"])
            out.append("")
        if facts["problems"]:
            out.append("**Read problems:**")
            out.append("")
            out.extend(f"- {md_text(p)}" for p in facts["problems"])
            out.append("")

    if diag.summary:
        out.append("## Summary")
        out.append("")
        out.append("| Key | Value |")
        out.append("|---|---|")
        for k, v in diag.summary.items():
            out.append(f"| {md_code(k, True)} | {_cell(fmt_value(v))} |")
        out.append("")

    return safe_output("\n".join(out).rstrip("\n") + "\n")
