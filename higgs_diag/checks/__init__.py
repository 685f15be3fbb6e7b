"""The check registry. Each check is a small pure function ``(run, thresholds) -> iterable of Finding``,
registered with its stable code and category slug; its docstring is its documentation (rendered by
``higgs-diag explain CODE`` and into ``docs/checks.md``) with the sections
``What it detects`` / ``Why it happens`` / ``Example`` / ``Fix``.

Inside a check, build findings with :func:`finding`; the registry fills in the code, the category and
the rank unless the check sets them (a check may emit a second code of its own family, declared in
``also``).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..config import Thresholds
from ..diagnosis import Finding, Severity
from ..run.model import Run

CheckFunc = Callable[[Run, Thresholds], Iterable[Finding]]


@dataclass
class Check:
    code: str
    category: str
    name: str
    func: CheckFunc
    rank: int
    scope: str  # "generic" (any HF Trainer run) or "higgs" (audio-specific)
    also: dict[str, str] = field(default_factory=dict)  # extra code -> category this check may emit

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.func.__doc__ or "")

    @property
    def summary(self) -> str:
        return self.doc.splitlines()[0] if self.doc else self.name


REGISTRY: dict[str, Check] = {}
_MODULES = ("inputs", "console", "evaluation", "audio", "numerics", "optimisation", "schedule", "config_checks",
            "resume", "replay")


def check(code: str, category: str, *, rank: int = 50, scope: str = "generic",
          also: dict[str, str] | None = None) -> Callable[[CheckFunc], CheckFunc]:
    """Register a check. ``rank``: lower is more fundamental (root causes before symptoms)."""

    def deco(func: CheckFunc) -> CheckFunc:
        if code in REGISTRY:
            raise RuntimeError(f"check code {code} registered twice")
        REGISTRY[code] = Check(code, category, func.__name__, func, rank, scope, dict(also or {}))
        for extra in (also or {}):
            if extra in REGISTRY:
                raise RuntimeError(f"check code {extra} registered twice")
        return func

    return deco


def finding(severity: Severity, title: str, *, evidence: Iterable[str] = (), explanation: str = "",
            fix: str = "", steps: tuple[int, int] | None = None, caused_by: str | None = None,
            metrics: Iterable[str] = (), code: str = "", category: str = "") -> Finding:
    """A finding whose code and category the registry fills in (set ``code`` only for an ``also`` code)."""
    if steps is not None:
        steps = (int(steps[0]), int(steps[1]))
    return Finding(code=code, category=category, severity=severity, title=title, evidence=list(evidence),
                   explanation=explanation, fix=fix, steps=steps, caused_by=caused_by, metrics=tuple(metrics))


def load_all() -> dict[str, Check]:
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    return REGISTRY


def all_codes() -> dict[str, tuple[Check, str]]:
    """Every code a check can emit -> (check, category)."""
    out: dict[str, tuple[Check, str]] = {}
    for c in load_all().values():
        out[c.code] = (c, c.category)
        for extra, cat in c.also.items():
            out[extra] = (c, cat)
    return dict(sorted(out.items()))


def run_checks(run: Run, thresholds: Thresholds | None = None) -> list[Finding]:
    """Every check on a run's logs (the ``replay`` scope is left to :func:`run_replay_checks`)."""
    return _run([c for c in load_all().values() if c.scope != "replay"], run, thresholds)


def run_replay_checks(evidence, thresholds: Thresholds | None = None) -> list[Finding]:
    """The ``replay`` checks on what ``higgs-diag replay-batch`` measured (a ``ReplayEvidence``)."""
    return _run([c for c in load_all().values() if c.scope == "replay"], evidence, thresholds)


def _run(checks: list[Check], subject, thresholds: Thresholds | None) -> list[Finding]:
    t = thresholds or Thresholds()
    found: list[Finding] = []
    for c in sorted(checks, key=lambda c: c.code):
        for f in c.func(subject, t) or ():
            if not f.code:
                f.code = c.code
            if f.code != c.code and f.code not in c.also:
                raise RuntimeError(f"check {c.code} emitted undeclared code {f.code}")
            if not f.category:
                f.category = c.also.get(f.code, c.category)
            if f.rank == 50:
                f.rank = c.rank
            found.append(f)
    link_causes(found)
    return found


# Symptom -> root cause links that span checks: (symptom code, cause codes in order of preference).
CAUSAL_LINKS: list[tuple[str, tuple[str, ...]]] = []


def link_causes(findings: list[Finding]) -> None:
    """Fill ``caused_by`` for symptoms whose cause was found by another check."""
    present = {f.code for f in findings}
    for symptom, causes in CAUSAL_LINKS:
        cause = next((c for c in causes if c in present), None)
        if cause is None:
            continue
        for f in findings:
            if f.code == symptom and f.caused_by is None and f.code != cause:
                f.caused_by = cause


def causes(symptom: str, *cause_codes: str) -> None:
    """Declare that ``symptom`` is explained by the first present of ``cause_codes``."""
    CAUSAL_LINKS.append((symptom, cause_codes))
