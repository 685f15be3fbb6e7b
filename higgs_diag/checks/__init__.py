"""The check registry: one rule per code, as in ruff.

Each rule is a small pure function ``(subject, thresholds) -> iterable of Finding`` registered with
:func:`check` under one stable code and one category slug. ``subject`` is the :class:`~higgs_diag.run.model.Run`
for the log rules (scopes ``generic`` and ``higgs``) and the :class:`~higgs_diag.evidence.ReplayEvidence` for
the ``replay`` scope (its ``run`` attribute is the Run when the replay belongs to one).

The rule's docstring is its documentation, written once: a summary line, then the sections
``What it detects:`` / ``Why it happens:`` / ``Example:`` / ``Fix:``. ``higgs-diag explain``,
``docs/checks.md`` and every report show that text: the registry copies the rule's "Why it happens" into each
finding's ``explanation`` and its "Fix" into ``fix``. A finding adds only its evidence, and where it helps an
evidence-specific ``fix_detail`` (``"with max_steps=1000, e.g. warmup_steps=50"``) appended to the fix.

Thresholds are declared by the rule that uses them (``thresholds=("audio_loss_warning", ...)``, names of
:class:`higgs_diag.config.Thresholds`); ``higgs-diag checks`` lists them per rule.

Nothing here imports torch, ``replay/`` or ``trainer/``: the replay measures, these rules judge.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..config import Selection, Thresholds
from ..diagnosis import Finding, Severity

CheckFunc = Callable[[Any, Thresholds], Iterable[Finding]]

SECTIONS = ("What it detects", "Why it happens", "Example", "Fix")
_SECTION_RE = re.compile(r"^(" + "|".join(SECTIONS) + r"):\s*", re.M)
# generic: any HF Trainer run's logs; higgs: Higgs-specific log rules; replay: replay evidence;
# startup: advice the bundled trainer gives on its TrainingArguments before a run (analyze judges the
# logged values with other rules instead)
SCOPES = ("generic", "higgs", "replay", "startup")


def doc_sections(doc: str) -> dict[str, str]:
    """``{"summary": first line, "What it detects": ..., ...}`` with each section's lines joined into one
    paragraph (blank lines kept as paragraph breaks)."""
    doc = inspect.cleandoc(doc or "")
    lines = doc.splitlines()
    out = {"summary": lines[0].strip() if lines else ""}
    body = "\n".join(lines[1:])
    marks = list(_SECTION_RE.finditer(body))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        paras = re.split(r"\n\s*\n", body[m.end():end].strip())
        out[m.group(1)] = "\n\n".join(" ".join(p.split()) for p in paras if p.strip())
    return out


@dataclass(frozen=True)
class Check:
    code: str
    category: str
    name: str
    func: CheckFunc
    rank: int
    scope: str  # "generic" (any HF Trainer run), "higgs" (audio-specific), "replay" (replay evidence)
    thresholds: tuple[str, ...] = ()

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.func.__doc__ or "")

    def section(self, name: str) -> str:
        return doc_sections(self.doc).get(name, "")

    @property
    def summary(self) -> str:
        return self.section("summary") or self.name

    @property
    def why(self) -> str:
        return self.section("Why it happens")

    @property
    def fix(self) -> str:
        return self.section("Fix")


REGISTRY: dict[str, Check] = {}
_NOT_RULES = {"docgen"}  # modules of this package that hold no rules (and helpers named _*)


def check(code: str, category: str, *, rank: int = 50, scope: str = "generic",
          thresholds: Iterable[str] = ()) -> Callable[[CheckFunc], CheckFunc]:
    """Register a rule under ``code``. ``rank``: lower is more fundamental (root causes before symptoms);
    ``thresholds``: the :class:`Thresholds` names the rule reads."""
    names = tuple(thresholds)
    unknown = [n for n in names if n not in Thresholds.names()]
    if unknown:
        raise RuntimeError(f"check {code} declares unknown thresholds {unknown}")
    if scope not in SCOPES:
        raise RuntimeError(f"check {code}: unknown scope {scope!r}")

    def deco(func: CheckFunc) -> CheckFunc:
        if code in REGISTRY:
            raise RuntimeError(f"check code {code} registered twice")
        sections = doc_sections(func.__doc__ or "")
        missing = [s for s in SECTIONS if not sections.get(s)]
        if missing:
            raise RuntimeError(f"check {code} ({func.__name__}): docstring lacks {', '.join(missing)}")
        REGISTRY[code] = Check(code, category, func.__name__, func, rank, scope, names)
        return func

    return deco


def finding(severity: Severity, title: str, *, evidence: Iterable[str] = (), fix_detail: str = "",
            steps: tuple[int, int] | None = None, caused_by: str | None = None,
            metrics: Iterable[str] = ()) -> Finding:
    """A finding of the rule that yields it: the registry fills in code, category, rank, and the rule's
    explanation and fix (``fix_detail`` is appended to the fix)."""
    if steps is not None:
        steps = (int(steps[0]), int(steps[1]))
    return Finding(code="", category="", severity=severity, title=title, evidence=list(evidence),
                   explanation="", fix=fix_detail, steps=steps, caused_by=caused_by, metrics=tuple(metrics))


def load_all() -> dict[str, Check]:
    """Every rule: each module of this package registers its own on import."""
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_") and mod.name not in _NOT_RULES:
            importlib.import_module(f"{__name__}.{mod.name}")
    return dict(sorted(REGISTRY.items()))


def select_checks(selection: Selection | None = None, scopes: Iterable[str] = SCOPES) -> list[Check]:
    """The registered rules of ``scopes`` that ``selection`` (``--select`` / ``--ignore``) keeps."""
    wanted = set(scopes)
    sel = selection or Selection()
    return [c for c in load_all().values() if c.scope in wanted and sel.allows(c.code, c.category)]


def run_checks(run, thresholds: Thresholds | None = None, selection: Selection | None = None,
               replay_evidence=None) -> list[Finding]:
    """Every selected rule on a run's logs and, when given, on the replay evidence; causes linked across both."""
    found = _run(select_checks(selection, ("generic", "higgs")), run, thresholds) if run is not None else []
    if replay_evidence is not None:
        found += _run(select_checks(selection, ("replay",)), replay_evidence, thresholds)
    link_causes(found)
    return found


def _run(checks: list[Check], subject, thresholds: Thresholds | None) -> list[Finding]:
    t = thresholds or Thresholds()
    found: list[Finding] = []
    for c in checks:
        for f in c.func(subject, t) or ():
            f.code, f.category, f.rank = c.code, c.category, c.rank
            f.explanation = c.why
            f.fix = f"{c.fix} {f.fix}".strip() if f.fix else c.fix
            found.append(f)
    return found


# Symptom -> root cause links that span rules: (symptom code, cause codes in order of preference).
CAUSAL_LINKS: list[tuple[str, tuple[str, ...]]] = []


def link_causes(findings: list[Finding]) -> None:
    """Fill ``caused_by`` for symptoms whose cause was found by another rule."""
    present = {f.code for f in findings}
    for symptom, cause_codes in CAUSAL_LINKS:
        cause = next((c for c in cause_codes if c in present), None)
        if cause is None:
            continue
        for f in findings:
            if f.code == symptom and f.caused_by is None and f.code != cause:
                f.caused_by = cause


def causes(symptom: str, *cause_codes: str) -> None:
    """Declare that ``symptom`` is explained by the first present of ``cause_codes``."""
    CAUSAL_LINKS.append((symptom, cause_codes))
