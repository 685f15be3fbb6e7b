"""The collapse rule's offline form (``collapse_levels``, numpy) against its live form (``CollapseTracker.update``,
one point at a time, what the trainer's monitor runs): the same level at every point, the same events, the same
final state, on random series of every shape (episodes, excursions, NaN/Inf/0.0 points, steps out of order)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from higgs_diag.collapse import CollapseTracker, collapse_levels, collapse_levels_array


def _loop(steps, values, **kw):
    tr = CollapseTracker(kw["warning"], kw["critical"], kw["window"], kw.get("recovery_steps", 10))
    out = []
    for s, v in zip(steps, values):
        tr.update(int(s), float(v))
        out.append(tr.level)
    return out, tr


def _state(tr):
    return {f.name: getattr(tr, f.name) for f in dataclasses.fields(tr)}


def _random_series(rng, n):
    kind = rng.integers(0, 4)
    steps = np.arange(1, n + 1) * int(rng.integers(1, 4))
    if kind == 1:
        rng.shuffle(steps)  # out of order: the rule still compares steps the way the tracker does
    elif kind == 2:
        steps = np.sort(rng.integers(0, n, size=n))  # repeated steps
    # values around the two levels, with long stretches below, short excursions above and skipped points
    base = rng.choice([0.002, 0.004, 0.007, 0.009, 0.011, 0.02, 3.0], size=n,
                      p=[0.15, 0.15, 0.15, 0.1, 0.1, 0.15, 0.2])
    runs = np.repeat(base, 7)[:n] if kind == 3 else base
    v = runs.astype(float)
    v[rng.random(n) < 0.05] = np.nan
    v[rng.random(n) < 0.03] = 0.0
    v[rng.random(n) < 0.02] = np.inf
    return steps, v


@pytest.mark.parametrize("seed", range(300))
def test_numpy_levels_equal_the_tracker_fed_one_point_at_a_time(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 400))
    steps, v = _random_series(rng, n)
    kw = dict(warning=0.01, critical=float(rng.choice([0.005, 0.01, 0.003])),
              window=int(rng.choice([-1, 0, 1, 2, 5, 30, 100])), recovery_steps=int(rng.choice([0, 1, 2, 3, 10, 50])))
    want, tr_loop = _loop(steps, v, **kw)
    got, tr = collapse_levels(steps, v, **kw)
    assert got == want
    assert _state(tr) == _state(tr_loop)
    arr, _ = collapse_levels_array(steps, v, **kw)
    assert arr.dtype == np.int64 and arr.tolist() == want


def test_generators_lists_and_non_numeric_input_give_the_tracker_result():
    series = [(1, 0.02), (2, 0.004), (3, None), (4, "0.003"), (5, 0.5), (6, 0.5)]
    kw = dict(warning=0.01, critical=0.005, window=2, recovery_steps=2)
    want, tr_loop = _loop([s for s, _ in series], [math.nan if v is None else v for _, v in series], **kw)
    got, tr = collapse_levels((s for s, _ in series), (math.nan if v is None else v for _, v in series), **kw)
    assert got == want and _state(tr) == _state(tr_loop)
    got2, tr2 = collapse_levels([1.0, 2.5, 3.0], [0.004, 0.004, 0.004], **kw)  # float steps: int() as the tracker
    want2, tr2_loop = _loop([1.0, 2.5, 3.0], [0.004, 0.004, 0.004], **kw)
    assert got2 == want2 and _state(tr2) == _state(tr2_loop)


def test_a_long_collapse_is_linear_and_one_episode():
    n = 200_000
    steps = np.arange(1, n + 1)
    v = np.full(n, 0.004)
    v[::3] = 0.02  # excursions above shorter than the recovery window: one episode all along
    levels, tr = collapse_levels_array(steps, v, warning=0.01, critical=0.005, window=100)
    assert [e.kind for e in tr.events] == ["critical", "sustained"]
    assert levels[-1] == 3 and tr.below_since == 2


@pytest.mark.parametrize("kind", ["numpy", "many-dips"])
def test_both_paths_equal_the_tracker_on_long_series(kind):
    """A few long episodes go through numpy per episode; thousands of short dips through the tracker itself."""
    rng = np.random.default_rng(7)
    n = 30_000
    steps = np.arange(1, n + 1) * (100 if kind == "many-dips" else 1)  # 100-step gaps: one point recovers
    v = np.full(n, 3.0)
    if kind == "many-dips":
        v[::2] = 0.004
    else:
        for a in rng.integers(0, n - 500, size=20):
            v[a: a + rng.integers(5, 400)] = rng.choice([0.004, 0.008])
    v[rng.random(n) < 0.01] = np.nan
    kw = dict(warning=0.01, critical=0.005, window=100, recovery_steps=10)
    want, tr_loop = _loop(steps, v, **kw)
    got, tr = collapse_levels(steps, v, **kw)
    assert got == want and _state(tr) == _state(tr_loop)
