"""Audio-loss checks: the collapse of seed 004 and an audio loss that is not a loss at all."""
from __future__ import annotations

import numpy as np

from ..diagnosis import Severity
from . import causes, check, finding
from ._util import audio_loss_metrics, fmt

REPLAY_HINT = (
    "Run `higgs-diag replay-batch CHECKPOINT BATCH` on a saved batch to tell the causes apart: it recomputes the "
    "shifted and unshifted losses with your weights and inspects the labels."
)


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


def _sustained(steps: np.ndarray, below: np.ndarray, window: int) -> tuple[int, int] | None:
    """The first run of consecutive points below the threshold that spans at least ``window`` steps."""
    start = None
    for i, b in enumerate(below):
        if b:
            if start is None:
                start = i
            if steps[i] - steps[start] >= window:
                j = i
                while j + 1 < len(below) and below[j + 1]:
                    j += 1
                return int(steps[start]), int(steps[j])
        else:
            start = None
    return None


@check("HD201", "audio-loss-collapse", rank=5, scope="higgs")
def audio_loss_collapse(run, t):
    """The audio loss sinks towards zero: the model is solving a trivial task, not learning speech.

    What it detects: the audio-loss monitor of seed 004 on every audio-loss series (`audio_loss`,
    per-codebook `audio_loss_cb{k}`, their `eval_` forms): values below `audio_loss_warning` (0.01),
    below `audio_loss_critical` (0.005), or below the warning level for a sustained
    `audio_sustained_window` (100) steps; and the copy-task signature: a fall below
    `collapse_fraction` (1%) of the starting value within `collapse_within_steps` steps. Exact zeros
    are not a small loss and belong to audio-out-missing / audio-over-masked.

    Why it happens: a next-token cross-entropy over 1024 codes (+BOS/EOS) starts near ln(1026) ~ 6.9
    and does not approach 0 on real speech. It does when the task is trivial. Most likely first:
    (1) the audio loss is computed without the one-position shift, `CE(audio_logits[:, k],
    label_audio_ids[k])`, so the model only copies the current input token (boson_multimodal labels
    are aligned with the inputs, FACTS §1; boson-ai/higgs-audio#94); (2) `label_audio_ids` replaced by
    `audio_out_ids`, so BOS, delay-pattern fills and reference audio are trained; (3) almost all audio
    labels masked with -100, so a handful of easy targets remain; (4) empty audio logits guarded to a
    tiny constant.

    Example: `audio_loss 7.21 at step 1 -> 0.0041 at step 500 (0.06% of its start); below 0.005 from
    step 430 on; text_loss 1.9 -> 1.2`.

    Fix: compute the audio loss shifted, `CE(audio_logits[:-1, k], label_audio_ids[k, 1:])`, with
    `ignore_index=-100` (`higgs_diag.losses.dual_loss` or `higgs_diag.trainer.HiggsAudioTrainer`), and
    keep `label_audio_ids` from the collator. Then retrain: the weights learned a copy task.
    """
    metrics = [m for m in audio_loss_metrics(run)]
    for fam, names in _family(metrics).items():
        hits = []  # (metric, severity, evidence, (first, last))
        for m in names:
            s = run.series(m)
            v = s.to_numpy(dtype="float64")
            steps = s.index.to_numpy()
            ok = np.isfinite(v) & (v != 0.0)
            if ok.sum() < 2:
                continue
            v, steps = v[ok], steps[ok]
            start = _start_value(v)
            lo_i = int(np.argmin(v))
            lo = float(v[lo_i])
            ev, sev, span = [], None, None
            below_w = v < t.audio_loss_warning
            below_c = v < t.audio_loss_critical
            if below_c.any():
                i = int(np.argmax(below_c))
                sev = Severity.CRITICAL
                ev.append(f"{m} below {fmt(t.audio_loss_critical)} (critical) at {int(below_c.sum())} of {len(v)} "
                          f"logged steps, first at step {steps[i]}")
                span = (int(steps[i]), int(steps[-1]))
            elif below_w.any():
                i = int(np.argmax(below_w))
                sev = Severity.WARNING
                ev.append(f"{m} below {fmt(t.audio_loss_warning)} (warning) at {int(below_w.sum())} of {len(v)} "
                          f"logged steps, first at step {steps[i]}")
                span = (int(steps[i]), int(steps[-1]))
            sus = _sustained(steps, below_w, t.audio_sustained_window)
            if sus:
                sev = Severity.CRITICAL
                ev.append(f"{m} stayed below {fmt(t.audio_loss_warning)} over steps {sus[0]}-{sus[1]} "
                          f"(sustained window {t.audio_sustained_window} steps)")
            if start > 0 and np.isfinite(start):
                frac = v / start
                within = (steps - steps[0]) <= t.collapse_within_steps
                fell = (frac < t.collapse_fraction) & within
                if fell.any():
                    i = int(np.argmax(fell))
                    sev = Severity.CRITICAL
                    ev.append(f"copy-task signature: {m} fell from {fmt(start)} to {fmt(v[i])} "
                              f"({100 * v[i] / start:.2g}% of its start) by step {steps[i]}, "
                              f"{int(steps[i] - steps[0])} steps after the first point")
                    span = (int(steps[i]), int(steps[-1])) if span is None else (min(span[0], int(steps[i])), span[1])
            if sev is None:
                continue
            ev.append(f"{m}: {fmt(start)} at step {steps[0]} -> min {fmt(lo)} at step {steps[lo_i]}, "
                      f"last {fmt(v[-1])} at step {steps[-1]}")
            hits.append((m, sev, ev, span, lo))
        if not hits:
            continue
        sev = max(h[1] for h in hits)
        lead = hits[0]
        evidence = list(lead[2])
        others = [h[0] for h in hits[1:]]
        if others:
            evidence.append(f"also collapsed: {', '.join(others)}")
        text = run.series("eval_text_loss" if fam == "eval" else "text_loss")
        tf = text[np.isfinite(text.to_numpy())]
        if len(tf) >= 2:
            evidence.append(f"{'eval_' if fam == 'eval' else ''}text_loss meanwhile {fmt(tf.iloc[0])} -> "
                            f"{fmt(tf.iloc[-1])}")
        span = (min(h[3][0] for h in hits if h[3]), max(h[3][1] for h in hits if h[3]))
        yield finding(
            sev,
            f"{'Eval audio' if fam == 'eval' else 'Audio'} loss collapsed ({lead[0]} down to {fmt(lead[4])}): "
            "the model is learning a trivial task (most often the unshifted audio loss)",
            evidence=evidence,
            explanation=(
                "A next-token loss over the audio codebooks starts near ln(codebook_size + 2) (about 6.9 for "
                "Higgs Audio v2) and does not approach zero on real speech. Causes, most likely first: "
                "(1) the audio loss is computed without the one-position shift, so the model learns to copy the "
                "current input token (boson_multimodal aligns label_audio_ids with audio_out_ids); "
                "(2) label_audio_ids replaced by audio_out_ids, so BOS, delay-pattern fills and reference audio are "
                "trained; (3) nearly every audio label masked with -100; (4) empty audio logits guarded to a tiny "
                "constant. " + REPLAY_HINT),
            fix=("Shift the audio loss: CE(audio_logits[:-1, k], label_audio_ids[k, 1:]) per codebook with "
                 "ignore_index=-100 (higgs_diag.losses.dual_loss, or higgs_diag.trainer.HiggsAudioTrainer), keep the "
                 "collator's label_audio_ids, and retrain: these weights learned the wrong task."),
            steps=span, metrics=tuple(h[0] for h in hits))


@check("HD202", "audio-out-missing", rank=3, scope="higgs", also={"HD203": "audio-over-masked"})
def audio_loss_not_a_loss(run, t):
    """The audio loss is exactly 0.0 (or NaN while the text loss is finite): no audio target reached it.

    What it detects: an audio-loss series that is exactly 0.0, or NaN with a finite text loss.
    From the first logged step (HD202, audio-out-missing): `audio_out_ids` / `label_audio_ids` never
    reached the model. After a stretch of real values (HD203, audio-over-masked): the audio labels
    were emptied later; when the switch falls on an epoch boundary, by boson's collator writing -100
    into cached samples.

    Why it happens: `HiggsAudioModel` substitutes an empty `(num_codebooks, 0)` tensor when
    `audio_out_ids` is missing and returns `audio_logits` of shape `[0, 8, 1026]`; a trainer that guards
    the empty case returns 0.0, one that does not gets NaN (mean over zero targets). A filter on model
    inputs (`remove_unused_columns`, a whitelist in `compute_loss`) is the usual culprit. Boson's
    collator also mutates samples in place (it writes -100 into `label_ids` of reference turns): a
    dataset that caches its sample tensors loses every audio label the second time a sample is collated.

    Example: `audio_loss = 0.0 at all 120 logged steps (1-120) while text_loss 5.4 -> 2.1`.

    Fix: pass `audio_out_ids`, `audio_out_ids_start`, `audio_out_ids_start_group_loc` and
    `label_audio_ids` to the model (`remove_unused_columns=False`; no whitelist that drops them);
    copy cached samples before collating (`higgs_diag.trainer` does both); never turn an empty audio
    loss into 0.0 silently: count and report it.
    """
    for m in audio_loss_metrics(run):
        s = run.series(m)
        if len(s) < 2:
            continue
        v = s.to_numpy(dtype="float64")
        steps = s.index.to_numpy()
        bad = (v == 0.0) | np.isnan(v)
        if not bad.any():
            continue
        text = run.series("eval_text_loss" if m.startswith("eval_") else "text_loss")
        # the tail from the first bad point must be (nearly) all bad to call it a switch, not noise
        first = int(np.argmax(bad))
        tail = bad[first:]
        if tail.mean() < 0.9:
            continue
        if not text.empty:
            tt = text[text.index >= steps[first]].to_numpy(dtype="float64")
            if len(tt) and np.isfinite(tt).mean() < 0.9:
                continue  # the text loss went non-finite too: a numerics problem (non-finite), not missing targets
        kind = "0.0" if (v[first:][tail] == 0.0).mean() >= 0.5 else "NaN"
        ev = [f"{m} = {kind} at {int(tail.sum())} of {len(v)} logged steps ({steps[first]}-{steps[-1]})"]
        if not text.empty:
            tf = text[np.isfinite(text.to_numpy())]
            if len(tf) >= 2:
                ev.append(f"text_loss meanwhile {fmt(tf.iloc[0])} -> {fmt(tf.iloc[-1])}: the text part trains")
        if first == 0 or (first <= 1 and len(v) > 10):
            yield finding(
                Severity.CRITICAL,
                f"{m} is exactly {kind} from the first step: the model never received audio targets",
                evidence=ev + ["an exact 0.0 is not a small loss: no valid audio target reached the loss "
                               "(empty audio logits [0, C, V] guarded to 0, or every audio label -100)"],
                explanation="HiggsAudioModel returns audio_logits of shape [0, num_codebooks, codebook_size+2] "
                            "when audio_out_ids is missing; the audio loss over zero targets is then guarded to 0.0 "
                            "(or NaN unguarded). The model trains on text only and never learns to speak. "
                            + REPLAY_HINT,
                fix="Make audio_out_ids, audio_out_ids_start, audio_out_ids_start_group_loc and label_audio_ids "
                    "reach the model: remove_unused_columns=False, no input whitelist that drops them, and a "
                    "loss that reports zero valid audio targets instead of returning 0.0.",
                steps=(int(steps[first]), int(steps[-1])), metrics=(m,), code="HD202")
        else:
            boundary = _epoch_boundary(run.series("epoch"), int(steps[first]))
            if boundary:
                ev.append(boundary)
            ev.append(f"before step {steps[first]} {m} was {fmt(v[:first][-1])} (real values)")
            yield finding(
                Severity.CRITICAL,
                f"{m} dropped to exactly {kind} at step {steps[first]}"
                + (" at an epoch boundary: cached samples lost their audio labels" if boundary else
                   ": the audio labels were emptied"),
                evidence=ev,
                explanation=("Boson's collator writes -100 into the samples it is given; a dataset that caches "
                             "sample tensors hands the mutated samples back in the next epoch, with every audio "
                             "label masked, so no audio target reaches the loss." if boundary else
                             "From this step on no valid audio target reached the loss: the audio labels are "
                             "all -100 (over-masking) or the audio inputs stopped arriving. ") + " " + REPLAY_HINT,
                fix="Copy samples before collating (copy.deepcopy or clone the tensors in __getitem__), or use "
                    "higgs_diag.trainer, which guards the collator; check the masking of label_audio_ids.",
                steps=(int(steps[first]), int(steps[-1])), metrics=(m,), code="HD203")


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


causes("HD201", "HD202", "HD203")
