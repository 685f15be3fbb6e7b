"""Small helpers shared by the checks (formatting evidence, picking series)."""
from __future__ import annotations


import numpy as np
import pandas as pd

from ..formatting import fmt, steps_list, steps_text  # noqa: F401  (re-exported: the rules import them from here)


def finite(s: pd.Series) -> pd.Series:
    return s[np.isfinite(s.to_numpy(dtype="float64"))]


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
    objective that can be negative and need not fall; a negative loss value says the same.
    """
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
