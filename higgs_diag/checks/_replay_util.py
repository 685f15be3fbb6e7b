"""Helpers of the replay rules (``replay.py``, ``replay_batch.py``): distances between losses and the
per-batch vote on which loss a trainer computed. Plain numbers, no torch."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..evidence import BatchRecord, ReplayEvidence
from ._util import fmt


def dist(a: float | None, b: float | None) -> float:
    """|ln(a/b)|: how far apart two losses are as a ratio (inf when one is missing or not positive)."""
    if a is None or b is None or not (a > 0 and b > 0) or not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(math.log(a / b))


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def finite_pos(x: float | None) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) and x > 0 else None


def logged_value(b: BatchRecord, name: str) -> float | None:
    return b.logged.get(name) if b.logged is not None else None


def where(b: BatchRecord) -> str:
    if b.logged is None:
        return ""
    at = f" at step {b.logged.step}" if b.logged.step is not None else ""
    return f"{b.logged.source}{at}"


def with_model(ev: ReplayEvidence) -> list[BatchRecord]:
    return [b for b in ev.batches if b.model is not None]


def _median_at(series, step: int, n: int = 5) -> float | None:
    """The median of the last ``n`` finite logged values at or before ``step``."""
    import numpy as np

    v = series[series.index <= step].to_numpy(dtype="float64")
    v = v[np.isfinite(v)][-n:]
    return float(np.median(v)) if len(v) else None


def pairing(b: BatchRecord, ev: ReplayEvidence, t) -> tuple[str | None, str]:
    """Can the loss logged for batch ``b`` be compared with what its checkpoint computes on it? Only through the
    weights that produced it: the checkpoint of the batch's own step, or an earlier one at most
    ``replay_pair_max_steps`` before it while the logged loss held steady over that span (its median moved by
    less than ``replay_pair_max_change``). Returns ("exact" | "near" | None, why): "exact" for the checkpoint of
    the batch's own step (one optimizer update apart), "near" for an older one, None when not comparable."""
    if b.logged is None:
        return None, "no loss was logged for this batch"
    s, c = b.step if b.step is not None else b.logged.step, b.checkpoint_step
    if s is None:
        return None, "the batch's training step is unknown (pass --batch-step N)"
    if c is None:
        return None, "the checkpoint's step is unknown"
    if c == s:
        return "exact", f"checkpoint step {c} = batch step {s}"
    if c > s:
        return None, f"the checkpoint (step {c}) was saved {c - s} steps after the batch's loss was logged (step {s})"
    if s - c > t.replay_pair_max_steps:
        return None, (f"the checkpoint (step {c}) is {s - c} steps older than the batch (step {s}); more than "
                       f"replay_pair_max_steps={t.replay_pair_max_steps}")
    run = ev.run
    metric = next((m for m in ("audio_loss", "loss") if b.logged.get(m) is not None), None)
    if run is None or metric is None or not run.has(metric):
        return None, f"the checkpoint is {s - c} steps older than the batch and no logged curve shows the loss held"
    a, z = _median_at(run.series(metric), c), _median_at(run.series(metric), s)
    if a is None or z is None or dist(a, z) > math.log(1 + t.replay_pair_max_change):
        return None, (f"the logged {metric} moved from {fmt(a)} (step {c}) to {fmt(z)} (step {s}): the checkpoint's "
                       f"weights did not produce the batch's logged loss")
    return "near", f"checkpoint step {c}, batch step {s}; the logged {metric} held at {fmt(a)} -> {fmt(z)}"


@dataclass
class Vote:
    """One batch's answer to "did the trainer shift this loss?": ``verdict`` "unshifted", "shifted" or None
    (cannot tell), ``basis`` "logged" (its logged loss matched a recomputed one) or "internal" (the checkpoint's
    own numbers), and the evidence line."""

    batch: BatchRecord
    verdict: str | None
    basis: str | None
    line: str
    closeness: float = math.inf  # |ln(logged / matched)| for a logged vote


def losses_of(m, part: str) -> tuple[float | None, float | None]:
    return (m.audio_ce, m.audio_ce_unshifted) if part == "audio" else (m.text_ce, m.text_ce_unshifted)


def _decide(logged: float, s: float, u: float, exact: bool, t) -> str | None:
    """Which recomputed loss a logged value is: the one it is much closer to, when the two are far enough apart
    (``replay_separation_factor``); through the checkpoint of the batch's own step (one update apart) also when
    it lies within ``replay_exact_tolerance`` of one and more than twice that from the other."""
    closer = "unshifted" if dist(logged, u) < dist(logged, s) else "shifted"
    if dist(s, u) >= math.log(t.replay_separation_factor):
        return closer
    tol = math.log(1 + t.replay_exact_tolerance)
    if exact and min(dist(logged, u), dist(logged, s)) <= tol < 2 * tol <= max(dist(logged, u), dist(logged, s)):
        return closer
    return None


def _logged_vote(b: BatchRecord, part: str, t, exact: bool) -> Vote | None:
    m = b.model
    s, u = losses_of(m, part)
    logged, what = finite_pos(logged_value(b, f"{part}_loss")), f"{part}_loss"
    note = ""
    if logged is None and part == "audio" and logged_value(b, "audio_loss") is None and m.text_ce is not None:
        # only the total is logged (text + audio, as community trainers add them): its audio share is the total
        # minus the text CE the replay computed on the same batch
        total = finite_pos(logged_value(b, "loss"))
        if total is not None and total > m.text_ce:
            logged, what = total - m.text_ce, "loss"
            note = f" (logged total {fmt(total)} minus the replayed text CE {fmt(m.text_ce)})"
    if logged is None or s is None or u is None:
        return None
    verdict = _decide(logged, s, u, exact, t)
    if verdict is None:
        return None
    line = (f"{b.name}: logged {'audio share of ' if what == 'loss' else ''}{what} {fmt(logged)}{note} ({where(b)}) "
            f"vs recomputed with checkpoint step {b.checkpoint_step}: unshifted {fmt(u)}, shifted {fmt(s)} -> "
            f"matches the {verdict} loss")
    return Vote(b, verdict, "logged", line, min(dist(logged, u), dist(logged, s)))


def _internal_vote(b: BatchRecord, part: str, t, why_not_logged: str) -> Vote:
    """The checkpoint's own numbers: a model trained without the shift predicts the token it is given. It
    copies (argmax == current input) far more often than the data repeats itself, and its same-position CE is
    below its next-token CE; at the extreme its next-token CE is no better than a uniform guess. A model that
    predicts the next code better than the current one and better than a uniform guess was trained shifted.
    Weights that learned neither (both CEs near the uniform guess: an early checkpoint) give no reading."""
    m = b.model
    s, u = losses_of(m, part)
    copy = m.audio_copy_rate if part == "audio" else m.text_copy_rate
    rep = m.audio_repeat_rate if part == "audio" else m.text_repeat_rate
    if s is None or u is None or copy is None or rep is None:
        return Vote(b, None, None, "")
    uniform = m.uniform if part == "audio" else None
    line = (f"{b.name} (step {b.step}, checkpoint step {b.checkpoint_step}; logged loss not compared: "
            f"{why_not_logged}): argmax == current input at {pct(copy)} of the scored {part} positions (the data "
            f"repeats its last token at {pct(rep)}); CE same-position {fmt(u)}, next-token {fmt(s)}"
            + (f", uniform {fmt(uniform)}" if uniform else ""))
    copies = copy - rep >= t.replay_copy_margin and u < s
    unlearned = uniform is not None and s >= t.replay_uniform_fraction * uniform
    if copies or (unlearned and u < s and dist(s, u) >= math.log(t.replay_internal_separation)):
        return Vote(b, "unshifted", "internal", line)
    if s < u and not unlearned:
        return Vote(b, "shifted", "internal", line)  # it learned to predict the next code
    return Vote(b, None, None, line)  # these weights learned neither task yet: no reading


def shift_vote(b: BatchRecord, ev: ReplayEvidence, t, part: str = "audio") -> Vote:
    """One batch's vote (see :class:`Vote`): its logged loss decides when :func:`pairing` allows the comparison
    and the shifted and unshifted losses are ``replay_separation_factor`` apart; otherwise the checkpoint's own
    copy rate and CEs do."""
    if b.model is None:
        return Vote(b, None, None, "")
    level, why = pairing(b, ev, t)
    if level is not None:
        v = _logged_vote(b, part, t, exact=level == "exact")
        if v is not None:
            return v
        why = "the shifted and unshifted losses are too close to tell apart"
    return _internal_vote(b, part, t, why)
