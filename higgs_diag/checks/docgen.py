"""Render the check catalogue (docs/checks.md) from the registry: `python -m higgs_diag.checks.docgen`."""
from __future__ import annotations

from ..config import Thresholds
from . import SECTIONS, doc_sections, load_all


def rule_markdown(c) -> str:
    """One rule's documentation as Markdown (the same text `higgs-diag explain` prints)."""
    sec = doc_sections(c.doc)
    out = [f"_{sec['summary']}_", ""]
    for s in SECTIONS:
        out += [f"**{s}.** {sec.get(s, '')}", ""]
    if c.thresholds:
        out += ["Thresholds: " + ", ".join(f"`{n}` = `{getattr(Thresholds(), n)!r}`" for n in c.thresholds), ""]
    return "\n".join(out)


def render() -> str:
    rules = load_all()
    out = ["# Check catalogue", "",
           "Generated from the check registry by `make docs` (`python -m higgs_diag.checks.docgen`); "
           "a test fails when this file is stale. `higgs-diag explain CODE` prints the same text, and every "
           "finding of a rule carries its \"Why it happens\" and \"Fix\".", "",
           "Select or silence rules with `--select` / `--ignore` (codes, code prefixes such as `HD8`, or "
           "categories), on the command line or as `select = [...]` / `ignore = [...]` in the `--config` file.", "",
           "| code | category | scope | summary |", "|---|---|---|---|"]
    for code, c in rules.items():
        out.append(f"| [{code}](#{code.lower()}) | `{c.category}` | {c.scope} | {c.summary} |")
    out.append("")
    for code, c in rules.items():
        out += [f"## {code}", "", f"Category `{c.category}`; scope: {c.scope}.", "", rule_markdown(c)]
    users: dict[str, list[str]] = {}
    for code, c in rules.items():
        for n in c.thresholds:
            users.setdefault(n, []).append(code)
    out += ["## Thresholds", "", "Override with `--set NAME=VALUE` or `--config FILE` (JSON or TOML).", "",
            "| name | default | used by |", "|---|---|---|"]
    for name in Thresholds.names():
        out.append(f"| `{name}` | `{getattr(Thresholds(), name)!r}` | {', '.join(users.get(name, [])) or 'the trainer'} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
