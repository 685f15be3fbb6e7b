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


# One rule per code: where the conditions of the old multi-condition codes went (the old code keeps its main one).
MOVED = [
    ("HD001", "unreadable-input: Git LFS pointer / not a Trainer state / empty file / non-numeric values",
     "HD006 / HD007 / HD008 / HD009"),
    ("HD004", "an earlier session crashed, a later one completed", "HD005"),
    ("HD102", "checkpoint without trainer_state.json / early stopping silently off", "HD105 / HD106"),
    ("HD201", "the fall to 1% of the start (copy-task signature)", "HD204"),
    ("HD202", "audio loss emptied after real values", "HD203 (its own rule now)"),
    ("HD301", "grad_norm NaN / Inf while the loss is finite", "HD305 / HD306"),
    ("HD302", "loss frozen at its previous value / pinned to a constant with grad_norm 0", "HD303 / HD304"),
    ("HD401", "a flat loss with nonzero gradients", "HD406"),
    ("HD403", "spikes the run absorbs / spikes with clipping off", "HD407 / HD408"),
    ("HD404", "no improvement since warmup", "HD409"),
    ("HD405", "eval_loss rises while the best-model metric improves", "HD410"),
    ("HD501", "leading zeros / warmup >= run / rising to the end / peak step / peak value / no decay / Higgs range",
     "HD502 / HD503 / HD504 / HD505 / HD506 / HD507 / HD508"),
    ("HD601", "strategies / best metric without evaluation / eval_steps > max_steps / greater_is_better with a "
              "loss / metric not produced / NaN filter hid NaN / start-up: NaN filter, lr range, Arabic warmup",
     "HD602 / HD603 / HD604 / HD605 / HD606 / HD607 / HD608 / HD609 / HD610"),
    ("HD701", "epoch resets / missing steps / two runs in one folder", "HD703 / HD704 / HD705"),
]


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
    out += ["## Codes that moved", "", "Each code detects one condition. These codes used to cover several; the old "
            "code keeps its main condition and the others moved:", "", "| old code | condition | now |", "|---|---|---|"]
    out += [f"| {old} | {what} | {new} |" for old, what, new in MOVED]
    out.append("")
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
