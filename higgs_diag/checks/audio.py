"""Audio-loss checks: the collapse of seed 004 and an audio loss that is not a loss at all."""
from __future__ import annotations

import numpy as np

from ..diagnosis import Severity
from . import causes, check, finding
from ..collapse import CRITICAL, OK, classes_of, collapse_levels_array, scaled_level, uniform_reference
from ._util import audio_loss_metrics, fmt, is_higgs_run
from .overfitting import eval_rise


def _memorising(run, t) -> str | None:
    """Evidence that the train loss falls because the model memorises its training data (eval_loss rises after
    its minimum: HD405), or None. A copy task lowers the eval loss too; memorisation does not."""
    r = eval_rise(run, t)
    if r is None:
        return None
    return (f"eval_loss rises after its minimum ({fmt(r.vmin)} at step {r.smin} -> {fmt(r.last)} at step "
            f"{r.slast}): the train loss falls because the model memorises its data (overfitting), not a copy task")

def _family(metrics: list[str]) -> dict[str, list[str]]:
    """Group audio-loss series into train and eval families (total first, then per codebook)."""
    fams: dict[str, list[str]] = {}
    for m in metrics:
        fams.setdefault("eval" if m.startswith("eval_") else "train", []).append(m)
    for k in fams:
        fams[k].sort(key=lambda m: (m not in ("audio_loss", "eval_audio_loss"), m))
    return fams


def _start_value(v: np.ndarray, n: int = 5) -> float:
    head = v[:n]
    return float(np.median(head)) if len(head) else float("nan")


def _loss_points(run, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a series without its non-finite points and exact zeros (no target: HD202/HD203)."""
    s = run.series(metric)
    v = s.to_numpy(dtype="float64")
    ok = np.isfinite(v) & (v != 0.0)
    steps = s.index.to_numpy()
    return (steps, v) if ok.all() else (steps[ok], v[ok])


def _text_meanwhile(run, fam: str) -> list[str]:
    text = run.series("eval_text_loss" if fam == "eval" else "text_loss")
    tf = text[np.isfinite(text.to_numpy())]
    if len(tf) < 2:
        return []
    return [f"{'eval_' if fam == 'eval' else ''}text_loss meanwhile {fmt(tf.iloc[0])} -> {fmt(tf.iloc[-1])}"]


def _monitor_hit(m: str, steps: np.ndarray, v: np.ndarray, t, classes: int | None):
    """The collapse rule (``higgs_diag.collapse``, the trainer monitor's) on one logged series, the seed's levels
    scaled to the model's codebook geometry: (level, evidence, span) or None when it never left level ok."""
    warn, crit = scaled_level(t.audio_loss_warning, classes), scaled_level(t.audio_loss_critical, classes)
    levels, tr = collapse_levels_array(steps, v, warning=warn, critical=crit,
                                       window=t.audio_sustained_window, recovery_steps=t.audio_recovery_steps)
    worst = int(levels.max()) if len(levels) else OK
    if worst == OK:
        return None
    ev = []
    for e in tr.events:
        if e.kind in ("warning", "critical"):
            ev.append(f"{m} {fmt(e.value)} < {fmt(e.threshold)} ({e.kind}) at step {e.step}")
        elif e.kind == "sustained":
            ev.append(f"{m} stayed below {fmt(warn)} from step {e.episode_start} to step {e.step} "
                      f"(sustained window {t.audio_sustained_window} steps; excursions above shorter than "
                      f"{t.audio_recovery_steps} steps do not end it)")
        else:
            ev.append(f"{m} recovered: back at or above {fmt(warn)} from step {e.step}")
    lo_i = int(np.argmin(v))
    ev.append(f"{m}: {fmt(_start_value(v))} at step {steps[0]} -> min {fmt(v[lo_i])} at step {steps[lo_i]}, "
              f"last {fmt(v[-1])} at step {steps[-1]}")
    first = int(steps[int(np.argmax(levels != OK))])
    return worst, ev, (first, int(steps[-1])), float(v[lo_i])


@check("HD201", "audio-loss-collapse", rank=5, scope="higgs",
       thresholds=("audio_loss_warning", "audio_loss_critical", "audio_sustained_window", "audio_recovery_steps"))
def audio_loss_collapse(run, t):
    """The audio loss sinks below the seed's monitor levels: the model is solving a trivial task, not learning speech.

    What it detects: the audio-loss monitor of seed 004, the same rule (`higgs_diag.collapse`) that the
    bundled trainer's `AudioLossMonitor` applies live, on every logged audio-loss series (`audio_loss`,
    per-codebook `audio_loss_cb{k}`, their `eval_` forms, from the logs or the console): a value below
    `audio_loss_warning` (0.01) is a warning, below `audio_loss_critical` (0.005) critical, and an episode below
    the warning level that lasts `audio_sustained_window` (100) training steps is a sustained collapse
    (critical). An episode ends only after `audio_recovery_steps` (10) steps back above the warning level. The
    levels are the release model's (1024 codes + BOS/EOS, a uniform guess costs ln(1026) = 6.93); on another
    geometry they are the same fraction of ln(codebook_size + 2) from the logged `model_config`. When the eval
    loss rises after its minimum meanwhile (memorisation, HD405), the finding is a warning explained by the
    overfitting. Exact zeros are not a small loss and belong to HD202 / HD203.

    Why it happens: a next-token cross-entropy over the audio codebooks starts near ln(codebook_size + 2)
    (about 6.9 for Higgs Audio v2's 1024 codes + BOS/EOS) and does not approach 0 on real speech. It does when
    the task is trivial. Most likely first: (1) the audio loss is computed without the one-position shift,
    `CE(audio_logits[:, k], label_audio_ids[k])`, so the model only copies the current input token
    (boson_multimodal aligns label_audio_ids with audio_out_ids and computes no loss itself;
    boson-ai/higgs-audio#94); (2) `label_audio_ids` replaced by `audio_out_ids`, so BOS, delay-pattern fills
    and reference audio are trained; (3) almost all audio labels masked with -100, so a handful of easy
    targets remain; (4) empty audio logits guarded to a tiny constant. Run `higgs-diag replay-batch
    CHECKPOINT BATCH` on a saved batch to tell the causes apart: it recomputes the shifted and unshifted
    losses with your weights and inspects the labels.

    Example: `audio_loss 0.0041 < 0.005 (critical) at step 430; audio_loss stayed below 0.01 from step 412 to
    step 511; audio_loss: 7.21 at step 1 -> min 0.0038 at step 498`.

    Fix: compute the audio loss shifted, `CE(audio_logits[:-1, k], label_audio_ids[k, 1:])` per codebook
    with `ignore_index=-100` (`higgs_diag.losses.dual_loss` or `higgs_diag.trainer.HiggsAudioTrainer`), keep
    the collator's `label_audio_ids`, and retrain: these weights learned the wrong task.
    """
    classes = classes_of(run.model_config)
    memorising = _memorising(run, t)
    for fam, names in _family(audio_loss_metrics(run)).items():
        hits = []
        for m in names:
            steps, v = _loss_points(run, m)
            if len(v) >= 2:
                hit = _monitor_hit(m, steps, v, t, classes)
                if hit:
                    hits.append((m, *hit))
        if not hits:
            continue
        sev = Severity.CRITICAL if max(h[1] for h in hits) >= CRITICAL and not memorising else Severity.WARNING
        lead = hits[0]
        evidence = list(lead[2]) + ([f"also below the levels: {', '.join(h[0] for h in hits[1:])}"]
                                    if len(hits) > 1 else []) + _text_meanwhile(run, fam) \
            + ([memorising] if memorising and fam == "train" else [])
        span = (min(h[3][0] for h in hits), max(h[3][1] for h in hits))
        yield finding(sev, f"{'Eval audio' if fam == 'eval' else 'Audio'} loss collapsed ({lead[0]} down to "
                           f"{fmt(lead[4])}): the model is learning a trivial task (most often the unshifted audio loss)",
                      evidence=evidence, steps=span, metrics=tuple(h[0] for h in hits))


def _collapse_series(run) -> tuple[str | None, str | None]:
    """(train series, eval series) to judge for a copy task: the audio loss when it is logged, else, for a Higgs
    run that logs only the total (community trainers print the components to the console), the total loss."""
    audio = [m for m in audio_loss_metrics(run) if not m.startswith("eval_")]
    if audio:
        train = "audio_loss" if "audio_loss" in audio else sorted(audio)[0]
        ev = "eval_" + train
        return train, ev if run.has(ev) else ("eval_loss" if train == "audio_loss" and run.has("eval_loss") else None)
    if is_higgs_run(run) and run.has("loss"):
        return "loss", "eval_loss" if run.has("eval_loss") else None
    return None, None


@check("HD204", "audio-loss-collapse", rank=6, scope="higgs",
       thresholds=("collapse_fraction", "collapse_within_steps", "overfit_min_evals", "overfit_rise_fraction"))
def audio_loss_fell_from_start(run, t):
    """The loss fell by two orders of magnitude within a few hundred steps, far below what next-token prediction of speech can reach: the copy-task signature.

    What it detects: the audio loss (`audio_loss`, else a codebook's; for a Higgs run that logs only the total,
    as community trainers do, the total `loss`) falls below `collapse_fraction` (1%) of its start (the median
    of its first five points) within `collapse_within_steps` (1000) steps, and below `collapse_fraction` of the
    uniform guess ln(codebook_size + 2) (from the logged `model_config`; 1026 classes by default). Both are
    scale-free: no absolute level, so the rule holds on the tiny test model, the release's 8 x 1026 codes and a
    total loss alike. Critical when the eval loss fell with it (or was not logged); when the eval loss rises
    after its minimum instead (at least `overfit_min_evals` evaluations, `overfit_rise_fraction` above it), the
    model memorises its data: a warning explained by the overfitting (HD405).

    Why it happens: a next-token cross-entropy over the audio codebooks starts near ln(codebook_size + 2)
    and fine-tuning lowers it by a fraction, not by two orders of magnitude in a few hundred steps: real
    speech is not that predictable. A fall that steep on held-out data too means the task became trivial: most
    often the loss is computed without the one-position shift, so the model only copies the current input
    token; or the labels are the inputs, or the target audio is in the reference audio, or almost all labels
    are masked. Run `higgs-diag replay-batch CHECKPOINT BATCH` on a saved batch to tell the causes apart.

    Example: `loss fell from 9.84 to 0.061 (0.62% of its start, 0.88% of the uniform guess ln(1026) = 6.93) by
    step 180; eval_loss fell with it: 9.71 -> 0.074`.

    Fix: compute the audio loss shifted, `CE(audio_logits[:-1, k], label_audio_ids[k, 1:])` per codebook
    with `ignore_index=-100` (`higgs_diag.losses.dual_loss` or `higgs_diag.trainer.HiggsAudioTrainer`), keep
    the collator's `label_audio_ids`, use a reference audio other than the target, and retrain.
    """
    train, ev_name = _collapse_series(run)
    if train is None:
        return
    steps, v = _loss_points(run, train)
    start = _start_value(v)
    if len(v) < 2 or not (start > 0 and np.isfinite(start)):
        return
    ref = uniform_reference(classes_of(run.model_config))
    fell = (v < t.collapse_fraction * start) & (v < t.collapse_fraction * ref) \
        & ((steps - steps[0]) <= t.collapse_within_steps)
    if not fell.any():
        return
    i = int(np.argmax(fell))
    evidence = [f"{train} fell from {fmt(start)} to {fmt(v[i])} ({100 * v[i] / start:.2g}% of its start, "
                f"{100 * v[i] / ref:.2g}% of the uniform guess ln({int(round(np.exp(ref)))}) = {fmt(ref)}) by step "
                f"{steps[i]}, {int(steps[i] - steps[0])} steps after the first point; last {fmt(v[-1])} at step "
                f"{steps[-1]}"]
    if train == "loss":
        evidence.append("only the total loss is logged: judged on the total (text + audio)")
    memorising = _memorising(run, t)
    if memorising:
        evidence.append(memorising)
    elif ev_name is not None:
        es, evv = _loss_points(run, ev_name)
        if len(evv) >= 2:
            evidence.append(f"{ev_name} fell with it: {fmt(evv[0])} (step {es[0]}) -> {fmt(evv[-1])} (step {es[-1]})")
    yield finding(Severity.WARNING if memorising else Severity.CRITICAL,
                  f"{train} fell to {100 * v[i] / start:.2g}% of its start within {int(steps[i] - steps[0])} steps"
                  + (": memorisation (the eval loss rises)" if memorising else
                     ", far below what next-token prediction can reach: the copy-task signature"),
                  evidence=evidence + _text_meanwhile(run, "train"), steps=(int(steps[i]), int(steps[-1])),
                  metrics=(train,) + ((ev_name,) if ev_name else ()))


def _zero_switch(run, m: str):
    """(first bad index, steps, values, kind, evidence) when ``m`` is exactly 0.0 (or NaN with a finite text
    loss) from some point to the end; None otherwise."""
    s = run.series(m)
    if len(s) < 2:
        return None
    v = s.to_numpy(dtype="float64")
    steps = s.index.to_numpy()
    bad = (v == 0.0) | np.isnan(v)
    if not bad.any():
        return None
    first = int(np.argmax(bad))
    tail = bad[first:]
    if tail.mean() < 0.9:  # the tail from the first bad point must be (nearly) all bad: a switch, not noise
        return None
    text = run.series("eval_text_loss" if m.startswith("eval_") else "text_loss")
    if not text.empty:
        tt = text[text.index >= steps[first]].to_numpy(dtype="float64")
        if len(tt) and np.isfinite(tt).mean() < 0.9:
            return None  # the text loss went non-finite too: a numerics problem (non-finite), not missing targets
    kind = "0.0" if (v[first:][tail] == 0.0).mean() >= 0.5 else "NaN"
    ev = [f"{m} = {kind} at {int(tail.sum())} of {len(v)} logged steps ({steps[first]}-{steps[-1]})"]
    tf = text[np.isfinite(text.to_numpy())]
    if len(tf) >= 2:
        ev.append(f"text_loss meanwhile {fmt(tf.iloc[0])} -> {fmt(tf.iloc[-1])}: the text part trains")
    return first, steps, v, kind, ev


def _from_start(first: int, n: int) -> bool:
    return first == 0 or (first <= 1 and n > 10)


@check("HD202", "audio-out-missing", rank=3, scope="higgs")
def audio_loss_zero_from_start(run, t):
    """The audio loss is exactly 0.0 (or NaN while the text loss is finite) from the first step: no audio target ever reached it.

    What it detects: an audio-loss series that is exactly 0.0, or NaN with a finite text loss, from its first
    logged step to the end (at least 90% of the points).

    Why it happens: `HiggsAudioModel` substitutes an empty `(num_codebooks, 0)` tensor when `audio_out_ids`
    is missing and returns `audio_logits` of shape `[0, 8, 1026]`; a trainer that guards the empty case
    returns 0.0, one that does not gets NaN (a mean over zero targets). The model trains on text only and never
    learns to speak. A filter on the model inputs (`remove_unused_columns`, a whitelist in `compute_loss`) is
    the usual culprit. `higgs-diag replay-batch` on a saved batch names the missing fields.

    Example: `audio_loss = 0.0 at all 120 logged steps (1-120); text_loss 5.4 -> 2.1: the text part trains`.

    Fix: make `audio_out_ids`, `audio_out_ids_start`, `audio_out_ids_start_group_loc` and `label_audio_ids`
    reach the model (`remove_unused_columns=False`, no input whitelist that drops them), and have the loss
    report zero valid audio targets instead of returning 0.0 (`higgs_diag.trainer.HiggsAudioTrainer` does both).
    """
    for m in audio_loss_metrics(run):
        hit = _zero_switch(run, m)
        if hit is None or not _from_start(hit[0], len(hit[2])):
            continue
        first, steps, v, kind, ev = hit
        yield finding(Severity.CRITICAL, f"{m} is exactly {kind} from the first step: the model never received audio "
                                         f"targets",
                      evidence=ev + ["an exact 0.0 is not a small loss: no valid audio target reached the loss "
                                     "(empty audio logits [0, C, V] guarded to 0, or every audio label -100)"],
                      steps=(int(steps[first]), int(steps[-1])), metrics=(m,))


@check("HD203", "audio-over-masked", rank=3, scope="higgs")
def audio_loss_zero_later(run, t):
    """The audio loss drops to exactly 0.0 (or NaN) after a stretch of real values: the audio labels were emptied.

    What it detects: an audio-loss series with real values at first that becomes exactly 0.0 (or NaN while
    the text loss stays finite) from some step to the end; the evidence says when the switch falls on an epoch
    boundary.

    Why it happens: from that step on no valid audio target reached the loss: every audio label is -100, or
    the audio inputs stopped arriving. At an epoch boundary the usual cause is boson's collator, which writes
    -100 into the samples it is given (the `label_ids` of reference turns): a dataset that caches its sample
    tensors hands the mutated samples back in the next epoch with every audio label masked. `higgs-diag
    replay-batch` on a batch of that step shows the masking.

    Example: `audio_loss = 0.0 at 60 of 120 logged steps (61-120); the switch at step 61 follows the end of
    epoch 1 (epoch 0.99 -> 1.01); before step 61 audio_loss was 3.2`.

    Fix: copy samples before collating (`copy.deepcopy`, or clone the tensors in `__getitem__`), or use
    `higgs_diag.trainer`, which guards the collator; check the masking of `label_audio_ids`, and count batches
    without audio targets instead of logging 0.0.
    """
    for m in audio_loss_metrics(run):
        hit = _zero_switch(run, m)
        if hit is None or _from_start(hit[0], len(hit[2])):
            continue
        first, steps, v, kind, ev = hit
        boundary = _epoch_boundary(run.series("epoch"), int(steps[first]))
        ev += ([boundary] if boundary else []) + [f"before step {steps[first]} {m} was {fmt(v[:first][-1])} (real values)"]
        yield finding(Severity.CRITICAL,
                      f"{m} dropped to exactly {kind} at step {steps[first]}"
                      + (" at an epoch boundary: cached samples lost their audio labels" if boundary else
                         ": the audio labels were emptied"),
                      evidence=ev, steps=(int(steps[first]), int(steps[-1])), metrics=(m,))


def _epoch_boundary(ep, step: int) -> str:
    """Text naming the epoch boundary crossed between the last point before ``step`` and ``step``, or ''."""
    before, after = ep[ep.index < step], ep[ep.index >= step]
    if before.empty or after.empty:
        return ""
    prev, cur = float(before.iloc[-1]), float(after.iloc[0])
    k = np.ceil(prev - 1e-9)  # the first whole epoch not yet finished at the previous point
    if k >= 1 and k < cur:
        return f"the switch at step {step} follows the end of epoch {int(k)} (epoch {fmt(prev)} -> {fmt(cur)})"
    return ""


causes("HD201", "HD202", "HD203", "HD405")
causes("HD204", "HD202", "HD203", "HD405")
