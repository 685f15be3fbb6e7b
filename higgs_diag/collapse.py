"""The one audio-loss collapse rule (seed 004), torch-free: used live by the trainer's ``AudioLossMonitor``
and offline by HD201 on the logged series, so that both call the same step the same level.

The seed's levels are the release model's (8 codebooks x 1026 classes, a uniform guess costs ln(1026) = 6.93);
on another geometry they are scaled to the same fraction of ln(codebook_size + 2) (:func:`scaled_level`).

Levels: ``0`` ok, ``1`` warning (below ``warning``, 0.01), ``2`` critical (below ``critical``, 0.005),
``3`` sustained (an episode below ``warning`` has lasted ``window`` steps, 100). An episode starts at the first
value below ``warning`` and ends only when the loss has been back at ``warning`` or above for
``recovery_steps`` consecutive steps (10): shorter excursions above do not end it, so a loss hovering at
the threshold is one episode. Steps are training steps, not logged points: a series logged every N steps
covers a window in window/N points. Non-finite values and exact zeros are skipped (an exact 0.0 is not a
small loss but no audio target at all: HD202/HD203).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

OK, WARNING, CRITICAL, SUSTAINED = 0, 1, 2, 3
RELEASE_CLASSES = 1026  # Higgs Audio v2: 1024 codes + stream BOS + stream EOS per codebook
LEVEL_NAMES = {OK: "ok", WARNING: "warning", CRITICAL: "critical", SUSTAINED: "sustained"}
DEFAULT_RECOVERY_STEPS = 10


@dataclass(frozen=True)
class CollapseEvent:
    kind: str  # warning | critical | sustained | recovery
    step: int  # the step it was raised at (a recovery: the first step back above)
    value: float
    threshold: float
    episode_start: int  # first step of the episode below the warning threshold


@dataclass
class CollapseTracker:
    """Feed one (step, audio loss) at a time with :meth:`update`; :attr:`level` is the level after it."""

    warning: float = 0.01
    critical: float = 0.005
    window: int = 100
    recovery_steps: int = DEFAULT_RECOVERY_STEPS
    level: int = OK
    below_since: int | None = None  # first step of the current episode
    above_since: int | None = None  # first step of the current stretch back above, inside an episode
    streak_level: int = OK  # worst of warning/critical reached in the episode
    sustained: bool = False
    events: list[CollapseEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.critical <= self.warning:
            raise ValueError(f"critical threshold {self.critical} must not exceed the warning threshold {self.warning}")
        self.recovery_steps = max(1, int(self.recovery_steps))

    def update(self, step: int, value: float | None) -> list[CollapseEvent]:
        """The events this value raises; values that are None, non-finite or exactly 0.0 change nothing."""
        if value is None or not math.isfinite(value) or value == 0.0:
            return []
        v, new = float(value), []
        lvl = CRITICAL if v < self.critical else WARNING if v < self.warning else OK
        if lvl == OK:
            if self.below_since is not None:
                if self.above_since is None:
                    self.above_since = step
                if step - self.above_since + 1 >= self.recovery_steps:
                    new.append(CollapseEvent("recovery", self.above_since, v, self.warning, self.below_since))
                    self.below_since = self.above_since = None
                    self.streak_level, self.sustained = OK, False
        else:
            self.above_since = None
            if self.below_since is None:
                self.below_since = step
            if lvl > self.streak_level:
                kind = "critical" if lvl == CRITICAL else "warning"
                new.append(CollapseEvent(kind, step, v, self.critical if lvl == CRITICAL else self.warning,
                                         self.below_since))
                self.streak_level = lvl
        if self.below_since is not None and not self.sustained and lvl != OK \
                and step - self.below_since + 1 >= self.window:
            new.append(CollapseEvent("sustained", step, v, self.warning, self.below_since))
            self.sustained = True
        # the level of this step: the episode's worst while it lasts, ok once recovered
        self.level = SUSTAINED if self.sustained else (self.streak_level if self.below_since is not None else OK)
        self.events.extend(new)
        return new


def uniform_reference(classes: int | None) -> float:
    """ln(codebook_size + 2): the cross-entropy of a uniform guess over one codebook's classes."""
    return math.log(classes if classes and classes > 1 else RELEASE_CLASSES)


def scaled_level(level: float, classes: int | None) -> float:
    """A seed level (set for the release's 1026 classes) on another codebook geometry: the same fraction of the
    uniform reference ln(classes)."""
    return level * uniform_reference(classes) / math.log(RELEASE_CLASSES)


def classes_of(config) -> int | None:
    """codebook_size + 2 from a model config (dict or object), or None."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    size = get("audio_codebook_size", None) if config is not None else None
    return int(size) + 2 if isinstance(size, (int, float)) and not isinstance(size, bool) and 0 < size < 10 ** 7 \
        else None


def collapse_levels(steps: Iterable[int], values: Iterable[float], *, warning: float, critical: float,
                    window: int, recovery_steps: int = DEFAULT_RECOVERY_STEPS) -> tuple[list[int], CollapseTracker]:
    """The level after each (step, value) of a logged series, and the tracker (its events)."""
    tr = CollapseTracker(warning, critical, window, recovery_steps)
    out = []
    for s, v in zip(steps, values):
        tr.update(int(s), float(v))
        out.append(tr.level)
    return out, tr
