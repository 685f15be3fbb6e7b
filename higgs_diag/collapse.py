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

import numpy as np

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
    """The level after each (step, value) of a logged series, and the tracker (its events): what feeding them one
    at a time to :meth:`CollapseTracker.update` gives (the tracker ends in the same state), computed with numpy."""
    levels, tr = collapse_levels_array(steps, values, warning=warning, critical=critical, window=window,
                                       recovery_steps=recovery_steps)
    return levels.tolist(), tr


def collapse_levels_array(steps: Iterable[int], values: Iterable[float], *, warning: float, critical: float,
                          window: int, recovery_steps: int = DEFAULT_RECOVERY_STEPS
                          ) -> tuple[np.ndarray, CollapseTracker]:
    """:func:`collapse_levels` with the levels as an int64 array.

    Linear in the number of points whatever their order: the episodes are found by chaining "next point below
    the warning level" and "next point that completes ``recovery_steps`` back above it" (both precomputed for
    every point), and each episode's events and levels come from numpy over its own points."""
    tr = CollapseTracker(warning, critical, window, recovery_steps)
    steps = steps if hasattr(steps, "__len__") else list(steps)
    values = values if hasattr(values, "__len__") else list(values)
    st, v = _as_arrays(steps, values)
    if st is None:  # not plain integer steps and float values: the tracker itself, one point at a time
        return _one_at_a_time(tr, steps, values)
    n = len(st)
    levels = np.zeros(n, dtype=np.int64)
    with np.errstate(invalid="ignore"):
        if not (v < tr.warning).any():  # never below the warning level (NaN compares False): all ok, no events
            return levels, tr
    valid = np.flatnonzero(np.isfinite(v) & (v != 0.0))  # the others change nothing (update returns early)
    S, V = st[valid], v[valid]
    L = np.where(V < tr.critical, CRITICAL, np.where(V < tr.warning, WARNING, OK)).astype(np.int64)
    m = len(S)
    if m == 0 or not L.any():
        return levels, tr
    ok = L == OK
    if int(np.count_nonzero(~ok[1:] & ok[:-1])) > 256 + m // 64:
        # thousands of short dips (at most one episode each): numpy per episode would cost more than the loop
        return _one_at_a_time(tr, st, v)
    # the first point of the stretch back above the warning level that each point belongs to
    run_start = np.where(ok & ~np.concatenate(([False], ok[:-1])), np.arange(m), 0)
    run_start = np.maximum.accumulate(run_start)
    recovers = ok & (S - S[run_start] + 1 >= tr.recovery_steps)
    next_bad = _next_true(~ok)
    next_rec = _next_true(recovers)
    lv = np.zeros(m, dtype=np.int64)
    b = int(next_bad[0])
    while b < m:  # one iteration per episode: it starts at point b (below the warning level) ...
        e = int(next_rec[b])  # ... and ends at point e (the recovery), or runs to the end (e == m)
        Le = L[b:e]
        streak = np.maximum.accumulate(Le)
        ev_at: list[tuple[int, int, CollapseEvent]] = []
        first = int(Le[0])
        ev_at.append((b, 0, _event("critical" if first == CRITICAL else "warning", S[b], V[b], tr, S[b])))
        if first == WARNING:
            crit = np.flatnonzero(Le == CRITICAL)
            if len(crit):
                c = b + int(crit[0])
                ev_at.append((c, 0, _event("critical", S[c], V[c], tr, S[b])))
        sus = np.flatnonzero((Le != OK) & (S[b:e] - S[b] + 1 >= tr.window))
        k = b + int(sus[0]) if len(sus) else None
        if k is not None:
            ev_at.append((k, 1, CollapseEvent("sustained", int(S[k]), float(V[k]), tr.warning, int(S[b]))))
            streak[k - b:] = SUSTAINED
        lv[b:e] = streak
        ev_at.sort(key=lambda x: (x[0], x[1]))
        tr.events.extend(x[2] for x in ev_at)
        if e >= m:  # the episode lasts to the end: the tracker's state inside it
            tr.below_since = int(S[b])
            tr.above_since = int(S[run_start[m - 1]]) if ok[m - 1] else None
            tr.streak_level = int(np.maximum.accumulate(Le)[-1])
            tr.sustained = k is not None
            break
        tr.events.append(CollapseEvent("recovery", int(S[run_start[e]]), float(V[e]), tr.warning, int(S[b])))
        b = int(next_bad[e])  # lv[e] stays OK: the level once recovered
    tr.level = int(lv[-1])
    # a skipped point keeps the level of the point before it (OK before the first)
    levels[valid] = lv
    if m < n:
        last = np.zeros(n, dtype=np.int64)
        last[valid] = np.arange(1, m + 1)
        last = np.maximum.accumulate(last)
        levels = np.concatenate(([OK], lv))[last]
    return levels, tr


def _one_at_a_time(tr: CollapseTracker, steps, values) -> tuple[np.ndarray, CollapseTracker]:
    out = []
    for s, x in zip(steps, values):
        tr.update(int(s), float(x))
        out.append(tr.level)
    return np.asarray(out, dtype=np.int64), tr


def _event(kind: str, step, value, tr: CollapseTracker, start) -> CollapseEvent:
    return CollapseEvent(kind, int(step), float(value), tr.critical if kind == "critical" else tr.warning, int(start))


def _next_true(mask: np.ndarray) -> np.ndarray:
    """For every index, the first index at or after it where ``mask`` is True (``len(mask)`` when none)."""
    n = len(mask)
    idx = np.where(mask, np.arange(n), n)
    return np.minimum.accumulate(idx[::-1])[::-1]


def _as_arrays(steps, values) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(int64 steps, float64 values) cut to the shorter of the two, or (None, None) when they are not plain
    integers and numbers (the caller then feeds the tracker one point at a time)."""
    try:
        st = np.asarray(steps)
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None, None
    if st.ndim != 1 or v.ndim != 1 or st.dtype.kind not in "iu" or (st.dtype.kind == "u" and st.dtype.itemsize >= 8):
        return None, None
    n = min(len(st), len(v))
    return st[:n].astype(np.int64, copy=False), v[:n]
