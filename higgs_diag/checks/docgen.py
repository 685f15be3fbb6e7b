"""Render the check catalogue (docs/checks.md) from the registry: `python -m higgs_diag.checks.docgen`."""
from __future__ import annotations

import re

from ..config import Thresholds
from . import all_codes, load_all

SECTIONS = ("What it detects:", "Why it happens:", "Example:", "Fix:")


def _md(doc: str) -> str:
    lines = doc.splitlines()
    head, body = lines[0], "\n".join(lines[1:]).strip()
    for s in SECTIONS:
        body = re.sub(rf"(^|\n){re.escape(s)}\s*", rf"\1\n**{s[:-1]}.** ", body)
    return f"_{head}_\n\n{body.strip()}\n"


def render() -> str:
    load_all()
    out = ["# Check catalogue", "",
           "Generated from the check registry by `make docs` (`python -m higgs_diag.checks.docgen`); "
           "a test fails when this file is stale. `higgs-diag explain CODE` prints the same text.", "",
           "| code | category | scope | summary |", "|---|---|---|---|"]
    codes = all_codes()
    for code, (c, cat) in codes.items():
        summary = c.summary if code == c.code else f"emitted by {c.code}: {c.summary}"
        out.append(f"| [{code}](#{code.lower()}) | `{cat}` | {c.scope} | {summary} |")
    out.append("")
    seen = set()
    for code, (c, cat) in codes.items():
        if c.code in seen:
            continue
        seen.add(c.code)
        extra = "".join(f", {k} (`{v}`)" for k, v in c.also.items())
        anchors = "".join(f'<a id="{k.lower()}"></a>' for k in c.also)  # the table links every code
        out += [f"## {c.code}", "", f"{anchors}Category `{c.category}`{extra}; scope: {c.scope}.", "", _md(c.doc)]
    out += ["## Thresholds", "", "Override with `--set NAME=VALUE` or `--config FILE` (JSON or TOML).", "",
            "| name | default |", "|---|---|"]
    for name in Thresholds.names():
        out.append(f"| `{name}` | `{getattr(Thresholds(), name)!r}` |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
