"""The numpy paths the rules read the scalars through, held to the pandas definitions they replace: Run.series
(one value per step from the chosen source, the last of a repeated step), the per-Run cache, and the rolling
helpers (trailing medians at chosen points, O(n) window minima/maxima, the smoothed curve at chosen points)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from higgs_diag.checks import REGISTRY, load_all
from higgs_diag.checks import optimisation
from higgs_diag.checks._util import centred_max, smoothed, smoothed_at, trailing_medians_at, trailing_min
from higgs_diag.config import Thresholds
from higgs_diag.run.model import Run, pick_source


def _pandas_series(df: pd.DataFrame, metric: str) -> pd.Series:
    """Run.series as it was written with pandas (the definition)."""
    sub = df[df["metric"] == metric]
    if sub.empty:
        return pd.Series([], dtype="float64", name=metric, index=pd.Index([], dtype="int64", name="step"))
    counts = sub.groupby("source", observed=True)["step"].size()
    sub = sub[sub["source"] == pick_source(counts[counts > 0])]
    sub = sub.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    return pd.Series(sub["value"].to_numpy(dtype="float64"),
                     index=pd.Index(sub["step"].to_numpy(dtype="int64"), name="step"), name=metric)


def _frame(rng, n: int, categorical: bool) -> pd.DataFrame:
    df = pd.DataFrame({
        "step": rng.integers(0, max(1, n // 3), size=n).astype(np.int64),
        "metric": rng.choice(["loss", "eval_loss", "grad_norm", "epoch"], size=n),
        "value": rng.standard_normal(n),
        "source": rng.choice(["trainer_state", "tensorboard", "console"], size=n, p=[0.4, 0.4, 0.2]),
        "wall_time": np.nan, "file": rng.choice(["a", "b"], size=n), "segment": 0})
    df.loc[rng.random(n) < 0.05, "value"] = np.nan
    if rng.random() < 0.5:
        df = df.sort_values("step", kind="stable").reset_index(drop=True)
    if categorical:
        for c in ("metric", "source", "file"):
            df[c] = df[c].astype("category")
    if rng.random() < 0.3:
        df["step"] = df["step"].astype(np.int32)  # the loader's int32 steps
    return df


@pytest.mark.parametrize("seed", range(60))
def test_series_equals_the_pandas_definition(seed):
    rng = np.random.default_rng(seed)
    df = _frame(rng, int(rng.integers(0, 400)), categorical=bool(seed % 2))
    run = Run(root="r", scalars=df)
    want_metrics = sorted(m for m in df["metric"].unique() if isinstance(m, str))
    assert run.metrics == want_metrics
    for m in want_metrics + ["absent"]:
        got, want = run.series(m), _pandas_series(df, m)
        assert got.index.dtype == want.index.dtype == np.int64 and got.index.name == "step" and got.name == m
        assert np.array_equal(got.index.to_numpy(), want.index.to_numpy())
        assert np.array_equal(got.to_numpy().view(np.int64), want.to_numpy().view(np.int64))
        assert np.array_equal(np.sort(run.all_steps(m)), np.sort(df.loc[df["metric"] == m, "step"].to_numpy()))


def test_a_replaced_frame_drops_the_index_and_the_cache():
    df = pd.DataFrame({"step": [1, 2, 3], "metric": "loss", "value": [3.0, 2.0, 1.0], "source": "tensorboard",
                       "wall_time": np.nan, "file": "f", "segment": 0})
    run = Run(root="r", scalars=df)
    calls = []
    assert run.cached(("k",), lambda: calls.append(1) or len(run.series("loss"))) == 3
    assert run.cached(("k",), lambda: calls.append(1) or -1) == 3 and calls == [1]
    run.scalars = df[df["step"] > 1]
    assert run.series("loss").tolist() == [2.0, 1.0]
    assert run.cached(("k",), lambda: len(run.series("loss"))) == 2
    assert run.cached(["unhashable"], lambda: "computed") == "computed"


@pytest.mark.parametrize("seed", range(40))
def test_rolling_helpers_equal_pandas(seed):
    rng = np.random.default_rng(seed)
    n, w = int(rng.integers(1, 300)), int(rng.integers(1, 70))
    mp = int(rng.integers(1, w + 1))
    v = rng.random(n) * 10.0 ** rng.uniform(-4, 4, size=n)
    if seed % 3 == 0:
        v = rng.choice([0.5, 1.0, 2.0], size=n)  # ties
    ref = pd.Series(v).shift(1).rolling(w, min_periods=mp).median().to_numpy()
    got = trailing_medians_at(v, np.arange(n), w, mp)
    assert np.array_equal(np.isnan(ref), np.isnan(got))
    assert np.array_equal(ref[~np.isnan(ref)].view(np.int64), got[~np.isnan(got)].view(np.int64))
    assert np.array_equal(np.nan_to_num(pd.Series(v).shift(1).rolling(w, min_periods=1).min().to_numpy(), nan=np.inf),
                          trailing_min(v, w))
    start = int(rng.integers(0, n))
    assert np.array_equal(pd.Series(v).rolling(w, center=True, min_periods=1).max().to_numpy()[start:],
                          centred_max(v, w, start))
    s = pd.Series(v, index=np.arange(n) * 2)
    for frac in (0.05, 0.3, 1.0, 2.5):  # 2.5: the window is cut to the (maybe even) number of points
        idx = rng.integers(0, n, size=4)
        assert np.array_equal(smoothed(s, frac).to_numpy()[idx].view(np.int64), smoothed_at(s, frac, idx).view(np.int64))


@pytest.mark.parametrize("seed", range(40))
def test_divergence_bound_never_changes_the_finding(seed, monkeypatch):
    """HD402 with its O(n) early exit and without it (the rolling median over the whole curve) agree."""
    load_all()
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 3000))
    x = np.arange(n) / n
    shape = seed % 4
    loss = {0: 3 * np.exp(-3 * x), 1: np.where(x < 0.6, 3 - 3 * x, 1.2 + 6 * (x - 0.6)),
            2: np.where(x < 0.5, 2.0, 2.0 + 2 * (x - 0.5)), 3: np.full(n, 1.0)}[shape]
    loss = loss * (1 + float(rng.choice([0.01, 0.3])) * rng.standard_normal(n))
    df = pd.DataFrame({"step": np.arange(1, n + 1), "metric": "loss", "value": loss, "source": "trainer_state",
                       "wall_time": np.nan, "file": "s", "segment": 0})
    t = Thresholds().replace(divergence_factor=float(rng.choice([1.2, 1.5, 3.0])),
                             smooth_fraction=float(rng.choice([0.01, 0.05, 0.3])))
    rule = REGISTRY["HD402"].func
    with_bound = [vars(f) for f in rule(Run(root="r", scalars=df), t)]
    monkeypatch.setattr(optimisation, "_tail_cannot_diverge", lambda v, k, t: False)
    without = [vars(f) for f in rule(Run(root="r", scalars=df), t)]
    assert with_bound == without


def test_the_index_holds_no_copy_it_can_avoid():
    """Issue #10 (a 1 GiB event file under 1 GB): the positions are int32, a metric read from one source reads
    its positions themselves, the label codes are views of the frame's, and metrics logged at the same steps
    share one step index. Values stay the pandas definition's."""
    n = 3000
    steps = np.repeat(np.arange(1, n + 1, dtype=np.int32), 3)
    metric = np.tile(["loss", "grad_norm", "learning_rate"], n)
    ev = np.arange(500, n + 1, 500, dtype=np.int32)  # an evaluation: eval_loss and epoch again at its step
    df = pd.DataFrame({
        "step": np.concatenate((steps, np.repeat(ev, 2))),
        "metric": pd.Categorical(np.concatenate((metric, np.tile(["eval_loss", "epoch"], len(ev))))),
        "value": np.random.default_rng(0).random(3 * n + 2 * len(ev)),
        "source": pd.Categorical(["tensorboard"] * (3 * n + 2 * len(ev))),
        "wall_time": np.nan, "file": pd.Categorical(["f"] * (3 * n + 2 * len(ev))), "segment": np.int8(0)})
    run = Run(root="r", scalars=df)
    for m in ("loss", "grad_norm", "learning_rate", "eval_loss", "epoch"):
        assert run.positions(m).dtype == np.int32
        assert run.source_positions(m) is run.positions(m)
        got, want = run.series(m), _pandas_series(df, m)
        assert np.array_equal(got.index.to_numpy(), want.index.to_numpy()) and got.index.dtype == np.int64
        assert np.array_equal(got.to_numpy(), want.to_numpy())
    assert run.series("grad_norm").index is run.series("loss").index is run.series("learning_rate").index
    assert run.series("eval_loss").index is not run.series("loss").index
    codes, names = run.codes("metric")
    assert np.shares_memory(codes, df["metric"].array.codes) and not codes.flags.writeable
    # a second source: the chosen source's positions are a selection, not the positions themselves
    two = pd.concat([df, df.assign(source=pd.Categorical(["console"] * len(df)))], ignore_index=True)
    run2 = Run(root="r", scalars=two)
    assert len(run2.source_positions("loss")) == n and run2.source_positions("loss") is not run2.positions("loss")
    assert np.array_equal(run2.series("loss").to_numpy(), run.series("loss").to_numpy())
