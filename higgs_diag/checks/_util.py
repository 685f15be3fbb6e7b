"""Small helpers shared by the checks (formatting evidence, picking series)."""
from __future__ import annotations


import numpy as np
import pandas as pd

from ..formatting import fmt, steps_list, steps_text  # noqa: F401  (re-exported: the rules import them from here)


def finite(s: pd.Series) -> pd.Series:
    """The finite points of ``s``: ``s`` itself when all are (series are never modified in place; no copy)."""
    ok = np.isfinite(s.to_numpy(dtype="float64"))
    return s if ok.all() else s[ok]


def audio_loss_metrics(run) -> list[str]:
    """Every audio-loss series a trainer may log: total, per codebook, train and eval."""
    out = []
    for m in run.metrics:
        base = m[5:] if m.startswith("eval_") else m
        if base == "audio_loss" or base.startswith("audio_loss_") or base.startswith("audio_ce") \
                or (base.startswith("codebook") and "loss" in base):
            out.append(m)
    return out


# ---- run classification (used by the generic checks to stay quiet where a rule does not apply) -------

# Log keys that only preference / RL trainers (TRL's DPO, ORPO, KTO, GRPO, PPO) write: their `loss` is
# not a cross-entropy, it may be negative and need not fall, so loss-curve rules do not apply to it.
_NON_CE_KEY_PREFIXES = ("rewards/", "logps/", "logits/chosen", "logits/rejected", "completions/",
                        "clip_ratio", "reward", "kl", "policy/", "objective/", "odds_ratio", "nll_loss")


def is_higgs_run(run) -> bool:
    """True when the run trains a Higgs Audio model: its model config says ``higgs_audio`` (or the
    transformers port ``higgs_audio_v2``) or carries ``audio_*`` keys, or an audio loss was logged."""
    cfg = getattr(run, "model_config", None) or {}
    if isinstance(cfg, dict):
        mt = str(cfg.get("model_type") or "").lower()
        if mt.startswith("higgs_audio"):
            return True
        if any(str(k).startswith("audio_") for k in cfg):
            return True
    return bool(audio_loss_metrics(run))


def loss_not_cross_entropy(run) -> str | None:
    """Why the logged ``loss`` is not a cross-entropy whose rises and falls mean something, or None.

    Preference/RL trainers (keys such as ``rewards/chosen``, ``logps/rejected``, ``kl``) log an
    objective that can be negative and need not fall; a negative loss value says the same. Computed once per
    Run (a dozen rules ask).
    """
    if not hasattr(run, "cached"):  # a stand-in for a Run
        return _loss_not_cross_entropy(run)
    return run.cached(("_util.loss_not_cross_entropy",), lambda: _loss_not_cross_entropy(run))


def _loss_not_cross_entropy(run) -> str | None:
    keys = [m for m in run.metrics if any(m.startswith(p) for p in _NON_CE_KEY_PREFIXES)]
    if keys:
        return f"preference/RL objective (logged keys such as {', '.join(keys[:3])})"
    loss = finite(run.series("loss"))
    if not loss.empty and float(loss.min()) < 0:
        return f"the loss takes negative values (min {fmt(loss.min())} at step {int(loss.idxmin())})"
    return None


def smoothing_window(n_points: int, fraction: float, minimum: int = 1, maximum: int = 200) -> int:
    """A smoothing window of ``fraction`` of the logged points, kept odd and within [minimum, maximum]."""
    w = int(round(n_points * fraction))
    w = max(minimum, min(maximum, w))
    if w % 2 == 0:
        w += 1
    return max(1, min(w, max(1, n_points)))


def state_or_arg(run, state_field: str, arg_name: str | None = None):
    """A setting from the trainer state when it has it, else from the TrainingArguments (or None)."""
    st = getattr(run, "state", None)
    v = getattr(st, state_field, None) if st is not None else None
    if v is None and arg_name is not None:
        v = run.arg(arg_name)
    return v


# ---- series helpers shared by the curve rules (numerics, optimisation, overfitting, resume) ------------

def longest_true_run(mask) -> tuple[int, int, int]:
    """Length, start index and end index (inclusive) of the longest run of True in ``mask``
    ((0, -1, -1) when there is none); the first such run on ties."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return 0, -1, -1
    edges = np.diff(np.concatenate(([0], m.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)  # one past the run
    i = int(np.argmax(ends - starts))
    return int(ends[i] - starts[i]), int(starts[i]), int(ends[i] - 1)


def value_at(s: pd.Series, step: int) -> tuple[int, float] | None:
    """The last point of ``s`` (sorted by step) at or before ``step``, else its first point; None when empty."""
    if s.empty:
        return None
    i = int(s.index.searchsorted(step, side="right")) - 1
    i = max(i, 0)
    return int(s.index[i]), float(s.iloc[i])


def smoothed(s: pd.Series, fraction: float) -> pd.Series:
    """The finite points of ``s`` under a centred rolling median over ``fraction`` of them (at most 200)."""
    s = finite(s)
    w = smoothing_window(len(s), fraction)
    return s.rolling(w, center=True, min_periods=1).median() if w > 1 else s


# ---- rolling medians computed only where a rule needs them ---------------------------------------------
# pandas' rolling median (a skiplist) costs ~0.1 s over a 143k-point series with a 50-point window; the rules
# read it at a few points (the spikes, the steps they compare). These give the same float64 values there:
# the middle element of the window, or (a + b) / 2 of the two middle ones, which is what np.median computes.

def trailing_window_ok(window, min_periods) -> bool:
    """True when ``(window, min_periods)`` is a case the helpers below reproduce exactly (plain positive
    integers with min_periods <= window); otherwise the caller uses pandas' rolling itself."""
    ints = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (window, min_periods))
    return ints and 1 <= min_periods <= window


def trailing_medians_at(v: np.ndarray, idx: np.ndarray, window: int, min_periods: int) -> np.ndarray:
    """``pd.Series(v).shift(1).rolling(window, min_periods=min_periods).median()`` at the positions ``idx``
    (``v`` finite): the median of ``v[max(0, i - window):i]``, NaN where that holds fewer than ``min_periods``
    points."""
    idx = np.asarray(idx, dtype=np.int64)
    out = np.full(len(idx), np.nan)
    full = (idx >= window) & (idx <= len(v))
    if full.any():
        wins = np.lib.stride_tricks.sliding_window_view(v, window)
        rows = idx[full] - window
        res = np.empty(len(rows))
        for a in range(0, len(rows), 4096):  # bounded memory: 4096 windows at a time
            res[a:a + 4096] = np.median(wins[rows[a:a + 4096]], axis=1)
        out[full] = res
    for j in np.flatnonzero(~full & (idx >= min_periods) & (idx <= len(v))):
        out[j] = np.median(v[: idx[j]])
    return out


def trailing_min(v: np.ndarray, window: int) -> np.ndarray:
    """``min(v[max(0, i - window):i])`` for every i (``inf`` at i = 0), in O(n) whatever the window: blocks of
    ``window`` points with their running minimum from each end (van Herk / Gil-Werman)."""
    n = len(v)
    out = np.full(n, np.inf)
    if n <= 1:
        return out
    w = int(min(window, n))
    pre = np.minimum.accumulate(v[: min(w, n)])  # windows that start at 0: min(v[0:i])
    out[1: w + 1] = pre[: min(w, n - 1)]
    if n > w:
        nb = -(-n // w)
        pad = np.full(nb * w, np.inf)
        pad[:n] = v
        blocks = pad.reshape(nb, w)
        left = np.minimum.accumulate(blocks, axis=1).ravel()  # min from the block start to j
        right = np.empty_like(blocks)  # min from j to the block end (written through a reversed view: no copy)
        np.minimum.accumulate(blocks[:, ::-1], axis=1, out=right[:, ::-1])
        right = right.ravel()
        # windows v[a:a + w] give out[a + w], a = 1 .. n - w - 1: min(right[a], left[a + w - 1]), as slices
        np.minimum(right[1:n - w], left[w:n - 1], out=out[w + 1:])
    return out


def _centred_bounds(n: int, idx: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of pandas' centred window of ``window`` points at each position in ``idx``, clipped to [0, n)."""
    offset = (window - 1) // 2  # pandas: the window ends ``offset`` points after the position
    hi = np.minimum(idx + offset + 1, n)
    return np.maximum(idx + offset + 1 - window, 0), hi


def smoothed_at(s: pd.Series, fraction: float, idx) -> np.ndarray:
    """``smoothed(s, fraction).to_numpy()[idx]`` for ``s`` already finite, computing only those medians."""
    v = s.to_numpy(dtype="float64")
    idx = np.asarray(idx, dtype=np.int64)
    w = smoothing_window(len(v), fraction)
    if w <= 1:
        return v[idx]
    lo, hi = _centred_bounds(len(v), idx, w)
    return np.array([np.median(v[a:b]) for a, b in zip(lo.tolist(), hi.tolist())], dtype=np.float64)


def centred_max(v: np.ndarray, window: int, start: int) -> np.ndarray:
    """The maximum of pandas' centred window of ``window`` points (clipped at the ends) at every position from
    ``start`` to the end, in O(n) whatever the window (``trailing_min`` of the negated values)."""
    n, offset = len(v), (window - 1) // 2
    if start >= n:
        return np.zeros(0)
    # with ``window`` points of -inf on both sides, the window at i is ext[i + offset + 1 : i + offset + 1 + window]
    ext = np.concatenate((np.full(window, -np.inf), v, np.full(window, -np.inf)))
    sub = -ext[start + offset + 1:]
    return -trailing_min(sub, window)[np.arange(n - start) + window]
