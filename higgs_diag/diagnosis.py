"""Findings, severities, ranking and the verdict: the one result type of analyze and replay.

No torch, no transformers here (the analyze path stays light).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Iterable

SCHEMA = "higgs-diag.report/1"


class Severity(enum.IntEnum):
    INFO = 0
    WARNING = 1
    CRITICAL = 2

    def __str__(self) -> str:  # "info", "warning", "critical"
        return self.name.lower()

    @classmethod
    def parse(cls, text: "str | Severity") -> "Severity":
        if isinstance(text, Severity):
            return text
        try:
            return cls[str(text).strip().upper()]
        except KeyError:
            raise ValueError(f"unknown severity {text!r} (expected info, warning or critical)") from None


@dataclass
class Finding:
    """One diagnosed fact about a run.

    ``code`` is stable (``HD201``) and never reused; ``category`` is one of the slugs of DESIGN.md.
    ``evidence`` holds short lines naming steps, values and files; ``steps`` the first and last
    affected step; ``caused_by`` the code of the finding that explains this one.
    """

    code: str
    category: str
    severity: Severity
    title: str
    evidence: list[str] = field(default_factory=list)
    explanation: str = ""
    fix: str = ""
    steps: tuple[int, int] | None = None
    caused_by: str | None = None
    # Not part of the contract's required keys, but useful to renderers: which metrics to mark on plots.
    metrics: tuple[str, ...] = ()
    # Root cause rank inside one severity: lower is more fundamental (set by the check registry).
    rank: int = 50

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "category": self.category,
            "severity": str(self.severity),
            "title": self.title,
            "evidence": list(self.evidence),
            "explanation": self.explanation,
            "fix": self.fix,
            "steps": list(self.steps) if self.steps is not None else None,
            "caused_by": self.caused_by,
            "metrics": list(self.metrics),
        }


VERDICTS = {Severity.INFO: "healthy", Severity.WARNING: "warning", Severity.CRITICAL: "critical"}


def rank_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Most severe root cause first; a finding explained by another one follows its cause's group.

    Order: severity (desc), then root causes before symptoms (``caused_by`` set), then the check's
    rank, then first affected step, then code. Symptoms keep their own severity: a critical symptom
    still comes before a warning root cause, but after the critical finding that explains it.
    """
    items = list(findings)
    codes = {f.code for f in items}
    # A caused_by pointing at a finding that is not in this report explains nothing here.
    for f in items:
        if f.caused_by is not None and f.caused_by not in codes:
            f.caused_by = None

    def key(f: Finding):
        is_symptom = f.caused_by is not None
        first = f.steps[0] if f.steps else -1
        return (-int(f.severity), is_symptom, f.rank, first, f.code)

    return sorted(items, key=key)


@dataclass
class Diagnosis:
    """The result of analyze or replay: ranked findings and the ``summary`` of what was read (computed once,
    by ``higgs_diag.api.summarize``). ``run`` is the Run itself for the renderers' plots (not serialized);
    ``replay_error`` says why a requested replay did not run."""

    target: str
    findings: list[Finding]
    summary: dict[str, Any] = field(default_factory=dict)
    tool_version: str = ""
    run: Any = field(default=None, repr=False, compare=False)
    replay_error: str | None = None

    def __post_init__(self) -> None:
        self.findings = rank_findings(self.findings)
        if not self.tool_version:
            from . import __version__

            self.tool_version = __version__

    @property
    def verdict(self) -> str:
        worst = max((f.severity for f in self.findings), default=Severity.INFO)
        return VERDICTS[worst]

    def at_or_above(self, severity: Severity) -> list[Finding]:
        return [f for f in self.findings if f.severity >= severity]

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def by_category(self, category: str) -> list[Finding]:
        return [f for f in self.findings if f.category == category]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "tool_version": self.tool_version,
            "target": self.target,
            "verdict": self.verdict,
            "findings": [f.to_dict() for f in self.findings],
            "summary": self.summary,
        }
