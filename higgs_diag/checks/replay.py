"""Replay checks (HD800-HD809): what a saved batch, replayed through the checkpoint, says about the cause.

These run on what ``higgs-diag replay-batch`` measured (a :class:`higgs_diag.replay.evidence.ReplayEvidence`:
per-batch label statistics, the trainer's batch validation, shifted and unshifted cross-entropies, copy rates,
the losses the run logged), not on a run's logs; ``higgs-diag analyze RUN --replay`` merges them with the log
findings. No torch here: the numbers are plain data.
"""
from __future__ import annotations

import math

from ..diagnosis import Severity
from ..replay.evidence import BatchRecord, ReplayEvidence
from . import causes, check, finding
from ._util import fmt

AUDIO_FIELDS = ("audio_out_ids", "audio_out_ids_start", "audio_out_ids_start_group_loc", "label_audio_ids")


# ---- helpers ---------------------------------------------------------------------------------------------
def _dist(a: float | None, b: float | None) -> float:
    """|ln(a/b)|: how far apart two losses are as a ratio (inf when one is missing or not positive)."""
    if a is None or b is None or not (a > 0 and b > 0) or not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(math.log(a / b))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _finite_pos(x: float | None) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) and x > 0 else None


def _logged(b: BatchRecord, name: str) -> float | None:
    return b.logged.get(name) if b.logged is not None else None


def _where(b: BatchRecord) -> str:
    if b.logged is None:
        return ""
    at = f" at step {b.logged.step}" if b.logged.step is not None else ""
    return f"{b.logged.source}{at}"


def _with_model(ev: ReplayEvidence) -> list[BatchRecord]:
    return [b for b in ev.batches if b.model is not None]


def shift_vote(b: BatchRecord, t, part: str = "audio") -> tuple[str | None, str]:
    """('unshifted' | 'shifted' | None, evidence line) for one batch. ``part``: audio or text.

    With a logged loss: which recomputed loss (shifted or unshifted) it matches, provided the two are far
    enough apart to tell (``replay_separation_factor``). Without: the copy rate (argmax == current input
    token) well above the data's own repeat rate means the model was trained on the unshifted targets."""
    m = b.model
    if m is None:
        return None, ""
    s, u = (m.audio_ce, m.audio_ce_unshifted) if part == "audio" else (m.text_ce, m.text_ce_unshifted)
    if s is None or u is None:
        return None, ""
    sep = math.log(t.replay_separation_factor)
    logged = _finite_pos(_logged(b, f"{part}_loss"))
    what = f"{part}_loss"
    if logged is None and part == "audio" and _finite_pos(_logged(b, "loss")) is not None \
            and _logged(b, "audio_loss") is None:
        logged, s, u, what = _finite_pos(_logged(b, "loss")), m.total(), m.total(unshifted_audio=True), "loss"
    if logged is not None and s and u:
        if _dist(s, u) < sep:
            return None, ""
        closer = "unshifted" if _dist(logged, u) < _dist(logged, s) else "shifted"
        line = (f"{b.name}: logged {what} {fmt(logged)} ({_where(b)}) vs recomputed: unshifted {fmt(u)}, shifted "
                f"{fmt(s)} -> matches the {closer} loss")
        return closer, line
    copy = m.audio_copy_rate if part == "audio" else m.text_copy_rate
    rep = m.audio_repeat_rate if part == "audio" else m.text_repeat_rate
    if copy is None or rep is None:
        return None, ""
    line = (f"{b.name}: no logged {part} loss; the argmax equals the current input token at {_pct(copy)} of the "
            f"scored positions (the data repeats its last token at {_pct(rep)}); unshifted CE {fmt(u)}, shifted "
            f"{fmt(s)}")
    if copy >= t.replay_copy_rate and copy - rep >= t.replay_copy_margin and u < s:
        return "unshifted", line
    return "shifted", line


# ---- HD800 -------------------------------------------------------------------------------------------------
@check("HD800", "replay-summary", rank=99, scope="replay")
def replay_summary(ev: ReplayEvidence, t):
    """What the replay measured: the numbers every other replay finding is decided from.

    What it detects: nothing by itself (severity info). It reports, over the replayed batches, the
    per-codebook shifted cross-entropy `CE(audio_logits[:-1, k], label_audio_ids[k, 1:])` (what the model
    was supposed to learn) and the unshifted one `CE(audio_logits[:, k], label_audio_ids[k, :])` (the copy
    task), the uniform-guess reference ln(codebook_size + 2), the copy rate (how often the argmax equals the
    *current* input token) next to the data's own repeat rate, the same for text, and the losses the run
    logged for these batches.

    Why it happens: a replay reruns saved batches through the checkpoint with `torch.inference_mode`, so the
    numbers come from the user's own weights and data. A healthy model has a shifted audio CE well below
    ln(codebook_size + 2) and close to the logged `audio_loss`, an unshifted CE far above it, and a copy rate
    near the repeat rate.

    Example: `audio CE shifted 1.83 (per codebook 1.62, 1.79, 1.90, 2.01), unshifted 4.97, uniform ln(18) =
    2.89; copy rate 4.1% (repeat rate 1.9%); logged audio_loss 1.80 (batch dump, step 200) matches the
    shifted CE`.

    Fix: nothing to fix; read the other findings. Without them the logged loss is the shifted loss these
    weights give: training computes what it should.
    """
    if not ev.batches:
        return
    src = ev.source
    n = len(ev.batches)
    ev_lines = []
    if src is not None:
        ev_lines.append(f"checkpoint {src.path}: {src.describe}" + (f", base {src.base}" if src.base else "")
                        + (f", LoRA on {src.lora_modules} modules (r={src.lora_rank}, alpha={fmt(src.lora_alpha)} "
                           f"from {src.lora_alpha_from})" if src.lora_modules else ""))
    ev_lines.append(f"{n} batch file{'s' if n != 1 else ''}: " + ", ".join(b.name for b in ev.batches[:6])
                    + (" ..." if n > 6 else ""))
    tot = sum(b.stats.get("audio_targets", 0) for b in ev.batches)
    pos = sum(b.stats.get("audio_positions", 0) for b in ev.batches)
    txt = sum(b.stats.get("text_targets", 0) for b in ev.batches)
    ev_lines.append(f"labels: {tot} valid audio targets of {pos} audio label positions "
                    f"({_pct(1 - tot / pos) if pos else 'n/a'} -100), {txt} valid text targets")
    m = ev.model
    title = f"Checked {n} batch{'es' if n != 1 else ''} without the model"
    if m is not None:
        if m.audio_ce is not None:
            per = ", ".join(fmt(x) for x in m.audio_ce_per_cb if x is not None)
            ev_lines.append(f"audio CE shifted {fmt(m.audio_ce)} (per codebook {per}), unshifted "
                            f"{fmt(m.audio_ce_unshifted)}, uniform guess ln({m.vocab_audio}) = {fmt(m.uniform)}")
            ev_lines.append(f"audio copy rate {_pct(m.audio_copy_rate)} (argmax == current input token; the data "
                            f"repeats its last token at {_pct(m.audio_repeat_rate)}), top-1 accuracy "
                            f"{_pct(m.audio_accuracy)}")
        elif m.audio_logits_shape:
            ev_lines.append(f"audio_logits shape {m.audio_logits_shape}: no audio cross-entropy to compute")
        if m.text_ce is not None:
            ev_lines.append(f"text CE shifted {fmt(m.text_ce)} over {m.n_text} targets, unshifted "
                            f"{fmt(m.text_ce_unshifted)}; text copy rate {_pct(m.text_copy_rate)} (repeat rate "
                            f"{_pct(m.text_repeat_rate)})")
        sec = sum(b.model.forward_seconds for b in _with_model(ev))
        chk = sum(b.model.check_seconds for b in _with_model(ev))
        ev_lines.append(f"forward {sec:.3g} s, checks {chk:.3g} s ({ev.device}, {ev.dtype}"
                        + (f", {ev.world_size} ranks" if ev.world_size > 1 else "") + ")")
        title = (f"Replayed {n} batch{'es' if n != 1 else ''} through the checkpoint: shifted audio CE "
                 f"{fmt(m.audio_ce)} vs uniform {fmt(m.uniform)}, unshifted {fmt(m.audio_ce_unshifted)}"
                 if m.audio_ce is not None else f"Replayed {n} batch{'es' if n != 1 else ''} through the checkpoint")
    for b in ev.batches[:4]:
        if b.logged is not None:
            vals = ", ".join(f"{k} {fmt(v)}" for k, v in b.logged.values.items() if not k.startswith("audio_loss_cb"))
            ev_lines.append(f"logged for {b.name}: {vals} ({_where(b)})")
    if ev.eval is not None:
        e = ev.eval
        ev_lines.append("eval_loss: " + ("produced" if e.produced else "raises" if e.raises else "not produced")
                        + f" (label_names={e.label_names} from {e.label_names_from}, model class {e.model_class})")
    yield finding(Severity.INFO, title, evidence=ev_lines,
                  explanation=("The replay reran the saved batches through the checkpoint (no gradients) and computed "
                               "the trainer's dual loss both shifted and unshifted; the other findings are decided from "
                               "these numbers." if m is not None else
                               "--no-model: only the batch checks ran (the trainer's batch validation, label masking, "
                               "labels equal to inputs, delay pattern, BOS/EOS framing); replay through the checkpoint "
                               "for the loss comparisons."),
                  fix="Nothing to do unless another finding says so.")


# ---- HD801 -------------------------------------------------------------------------------------------------
@check("HD801", "audio-labels-unshifted", rank=1, scope="replay")
def replay_unshifted(ev: ReplayEvidence, t):
    """Replay: the trainer computes the loss without the one-position shift (the copy task).

    What it detects: the loss the run logged for a batch matches the *unshifted* cross-entropy
    `CE(audio_logits[:, k], label_audio_ids[k, :])` recomputed with the checkpoint on that batch, and not the
    shifted one, the two being at least `replay_separation_factor` (2x) apart; without logged losses, a copy
    rate (argmax == current input token) of at least `replay_copy_rate` (50%) and `replay_copy_margin` above
    the data's own repeat rate, with the unshifted CE below the shifted one. The same for the text loss.

    Why it happens: boson_multimodal aligns `label_audio_ids` with `audio_out_ids` (same positions: the label
    at t is the input at t) and computes no loss itself. A hand-written loss that does not shift scores every
    position against its own input, so the model learns to copy and the loss collapses to ~0.003 while the
    correctly shifted loss of the same weights is worse than a uniform guess (boson-ai/higgs-audio#94).

    Example: `logged audio_loss 0.0041 (batch dump, step 500) matches the unshifted CE 0.0043 of this batch;
    the shifted CE is 5.2 (uniform ln(1026) = 6.93); copy rate 99.7% (the data repeats its last token at
    2.1%)`.

    Fix: shift the loss: `CE(audio_logits[:-1, k], label_audio_ids[k, 1:])` per codebook and
    `CE(logits[:, :-1], expanded_labels[:, 1:])` for text, `ignore_index=-100`
    (`higgs_diag.losses.dual_loss`, or `higgs_diag.trainer.HiggsAudioTrainer`). Retrain: these weights
    learned to copy.
    """
    found = {}
    for part in ("audio", "text"):
        votes = [(b, *shift_vote(b, t, part)) for b in _with_model(ev)]
        un = [(b, line) for b, v, line in votes if v == "unshifted"]
        # lead with the batch whose logged loss is closest to its unshifted CE (the clearest evidence)
        un.sort(key=lambda x: _dist(_finite_pos(_logged(x[0], f"{part}_loss")),
                                    getattr(x[0].model, f"{part}_ce_unshifted")))
        sh = [b for b, v, _ in votes if v == "shifted"]
        if un and len(un) >= len(sh):
            found[part] = (un, sh)
    if not found:
        return
    m = ev.model
    evidence = []
    parts = []
    for part, (un, sh) in found.items():
        parts.append(part)
        evidence += [line for _, line in un[:4]]
        if len(un) > 4:
            evidence.append(f"... and {len(un) - 4} more batches")
        if sh:
            evidence.append(f"{len(sh)} batch(es) matched the shifted {part} loss instead")
    if m is not None and m.audio_ce is not None:
        evidence.append(f"audio CE of the checkpoint: shifted {fmt(m.audio_ce)} (per codebook "
                        f"{', '.join(fmt(x) for x in m.audio_ce_per_cb if x is not None)}), unshifted "
                        f"{fmt(m.audio_ce_unshifted)}, uniform guess ln({m.vocab_audio}) = {fmt(m.uniform)}")
        evidence.append(f"audio copy rate {_pct(m.audio_copy_rate)} (the data repeats its last token at "
                        f"{_pct(m.audio_repeat_rate)})")
    if "text" in found and m is not None and m.text_ce is not None:
        evidence.append(f"text CE shifted {fmt(m.text_ce)}, unshifted {fmt(m.text_ce_unshifted)}, text copy rate "
                        f"{_pct(m.text_copy_rate)}")
    b0, line0 = next(iter(found.values()))[0][0]
    part0 = next(iter(found))
    lg = _finite_pos(_logged(b0, f"{part0}_loss"))
    bm = b0.model
    if lg is not None and bm is not None:
        s = bm.audio_ce if part0 == "audio" else bm.text_ce
        u = bm.audio_ce_unshifted if part0 == "audio" else bm.text_ce_unshifted
        title = (f"Your logged {part0}_loss {fmt(lg)} matches the unshifted cross-entropy of this batch ({fmt(u)}); "
                 f"the correctly shifted loss is {fmt(s)}: the trainer computes the {' and '.join(parts)} loss "
                 f"without the one-position shift")
    else:
        title = (f"The checkpoint copies its input ({_pct(m.audio_copy_rate if part0 == 'audio' else m.text_copy_rate)} "
                 f"of positions): it was trained on the {' and '.join(parts)} loss without the one-position shift")
    yield finding(
        Severity.CRITICAL, title, evidence=evidence,
        explanation="boson_multimodal's labels are aligned with the inputs (label_audio_ids[k, t] == audio_out_ids[k, "
                    "t]) and the model computes no loss; a loss without the shift asks the model to predict the "
                    "token it is given, so it learns to copy and the loss collapses while the next-token loss (what "
                    "generation needs) is no better, or worse, than a uniform guess. Generation then produces "
                    "silence or noise.",
        fix="Shift the loss: CE(audio_logits[:-1, k], label_audio_ids[k, 1:]) for every codebook k and "
            "CE(logits[:, :-1], expanded_labels[:, 1:]) for text, ignore_index=-100 (higgs_diag.losses.dual_loss, or "
            "higgs_diag.trainer.HiggsAudioTrainer), and retrain: these weights learned to copy.",
        metrics=("audio_loss",))


# ---- HD802 -------------------------------------------------------------------------------------------------
@check("HD802", "audio-labels-are-inputs", rank=1, scope="replay")
def replay_labels_are_inputs(ev: ReplayEvidence, t):
    """Replay: `label_audio_ids` is a copy of `audio_out_ids` (no -100 anywhere).

    What it detects: batches whose `label_audio_ids` equals `audio_out_ids` element for element, without a
    single -100. Found from the batch alone (no model needed). With a correctly shifted loss this bug barely
    shows in the logs (the loss is only a little lower), so the replay finding leads.

    Why it happens: a collator (or a "fix" for the empty-audio-logits crash) builds the labels as
    `label_audio_ids = audio_out_ids.clone()`. boson's collator puts -100 at the stream BOS of every segment
    and at every delay-pattern fill, and masks reference audio; copying the inputs trains all of them: the
    model learns to predict BOS and fill tokens, and the shifted loss scores the last frame of one segment
    against the BOS of the next.

    Example: `step-000200.pt: label_audio_ids == audio_out_ids at all 4 x 56 positions (no -100; a collated
    batch masks the stream BOS and delay-pattern fills: 3 of 4 codebooks start with fills)`.

    Fix: use the collator's `label_audio_ids` (`HiggsAudioSampleCollator` returns them) and never replace them
    by the inputs; `higgs_diag.trainer.HiggsAudioTrainer` validates every batch and stops on this.
    """
    hits = [b for b in ev.batches if b.issue("labels-are-inputs")]
    if not hits:
        return
    evidence = []
    for b in hits[:4]:
        shape = b.shapes.get("label_audio_ids", [])
        evidence.append(f"{b.name}: label_audio_ids == audio_out_ids at all {' x '.join(map(str, shape))} positions, "
                        f"no -100; first label column of {b.stats.get('n_segments', 0)} segments is the stream BOS")
    if len(hits) > 4:
        evidence.append(f"... and {len(hits) - 4} more batches")
    if len(hits) < len(ev.batches):
        evidence.append(f"{len(ev.batches) - len(hits)} other batch(es) have proper labels")
    m = ev.model
    if m is not None and m.audio_ce is not None:
        evidence.append(f"replayed with these labels: shifted audio CE {fmt(m.audio_ce)}, uniform {fmt(m.uniform)}; "
                        f"the logged loss looks normal because the extra BOS/fill targets are easy")
    yield finding(
        Severity.CRITICAL,
        f"label_audio_ids are the audio inputs (audio_out_ids) in {len(hits)} of {len(ev.batches)} batch"
        f"{'es' if len(ev.batches) != 1 else ''}: the stream BOS, delay-pattern fills and reference audio are trained",
        evidence=evidence,
        explanation="boson's collator marks with -100 every label that must not be trained: the stream BOS that "
                    "opens each segment, the BOS/EOS fills of the delay pattern and reference audio. Labels copied "
                    "from the inputs train all of them; with the shift in place the loss still looks plausible, "
                    "so the logs do not show it.",
        fix="Pass the collator's label_audio_ids to the loss unchanged (never label_audio_ids = audio_out_ids); "
            "higgs_diag.trainer.HiggsAudioTrainer rejects such batches.",
        metrics=("audio_loss",))


# ---- HD803 -------------------------------------------------------------------------------------------------
@check("HD803", "audio-out-missing", rank=0, scope="replay")
def replay_audio_out_missing(ev: ReplayEvidence, t):
    """Replay: the audio-out inputs do not reach the model (empty audio logits `[0, C, V]`).

    What it detects: a batch without `audio_out_ids` (or with an empty one) while its `input_ids` hold
    `<|AUDIO_OUT|>` tokens or it carries `label_audio_ids`: the replayed forward returns `audio_logits` of
    shape `[0, C, V]`, and the finding names the missing fields. Or a complete batch (a dump of what the
    collator produced) whose logged `audio_loss` was exactly 0.0 (or NaN, or only the text loss was logged)
    although it holds valid audio targets, while the checkpoint's shifted audio CE on it is still at the
    uniform guess (at least `replay_uniform_fraction` of ln(codebook_size + 2)): the model never trained on
    audio. Or `label_audio_ids` missing while `audio_out_ids` is there.

    Why it happens: `HiggsAudioModel` substitutes an empty `(num_codebooks, 0)` tensor when `audio_out_ids`
    is missing and returns no audio logits; the audio loss has no target and a guard turns it into 0.0. A
    whitelist of model inputs in `compute_loss`, `remove_unused_columns=True` with a wrapper, or a collator
    that renames the fields drops them. A dump taken inside `compute_loss` after such a filter lacks the fields
    (found from the batch); a dump of the collated batch has them, and the cause shows in the numbers.

    Example: `step-000100.pt: no audio_out_ids, audio_out_ids_start, audio_out_ids_start_group_loc,
    label_audio_ids; input_ids hold 4 <|AUDIO_OUT|> tokens; replayed audio_logits [0, 4, 18]` or
    `logged audio_loss 0.0 (step 100) although the batch has 144 audio targets; the checkpoint's shifted
    audio CE 2.89 = uniform ln(18) 2.89: it never learned audio`.

    Fix: pass `audio_out_ids`, `audio_out_ids_start`, `audio_out_ids_start_group_loc` and `label_audio_ids`
    to the model (no input whitelist that drops them, `remove_unused_columns=False`), and never turn an empty
    audio loss into 0.0 (`higgs_diag.trainer.HiggsAudioTrainer` refuses it).
    """
    direct, numeric = [], []
    for b in ev.batches:
        missing = [f for f in AUDIO_FIELDS if f not in b.keys]
        empty = b.issue("empty-audio-out") is not None
        n_tok = b.stats.get("n_audio_out_tokens")
        wants_audio = bool(n_tok) or "label_audio_ids" in b.keys or "audio_out_ids" in b.keys
        if ("audio_out_ids" in missing or empty) and wants_audio:
            line = f"{b.name}: " + (f"no {', '.join(missing)}" if missing else "audio_out_ids is empty")
            if n_tok:
                line += f"; input_ids hold {n_tok} <|AUDIO_OUT|> tokens"
            if b.model is not None and b.model.audio_logits_shape:
                line += f"; replayed audio_logits {b.model.audio_logits_shape}"
            direct.append((b, line, missing or ["audio_out_ids"]))
            continue
        if "label_audio_ids" in missing and "audio_out_ids" not in missing:
            direct.append((b, f"{b.name}: audio_out_ids present but no label_audio_ids: the loss has no audio target",
                           ["label_audio_ids"]))
            continue
        m = b.model
        if m is None or m.audio_ce is None or not b.stats.get("audio_targets") or m.uniform is None:
            continue
        la, lt = _logged(b, "audio_loss"), _finite_pos(_logged(b, "loss"))
        unlearned = m.audio_ce >= t.replay_uniform_fraction * m.uniform
        zero_or_nan = la is not None and (la == 0.0 or (isinstance(la, float) and math.isnan(la)))
        text_only = la is None and lt is not None and m.text_ce is not None and \
            _dist(lt, m.text_ce) < _dist(lt, m.total())
        if unlearned and (zero_or_nan or text_only):
            what = f"logged audio_loss {fmt(la)}" if zero_or_nan else f"logged loss {fmt(lt)} equals the text CE {fmt(m.text_ce)}"
            numeric.append((b, f"{b.name}: {what} ({_where(b)}) although the batch has {b.stats['audio_targets']} valid "
                               f"audio targets; the checkpoint's shifted audio CE {fmt(m.audio_ce)} is the uniform guess "
                               f"ln({m.vocab_audio}) = {fmt(m.uniform)}: the model never learned audio"))
    if not direct and not numeric:
        return
    evidence = [x[1] for x in (direct + numeric)[:5]]
    if len(direct) + len(numeric) > 5:
        evidence.append(f"... and {len(direct) + len(numeric) - 5} more batches")
    if direct:
        fields = sorted({f for _, _, fs in direct for f in fs}, key=AUDIO_FIELDS.index)
        title = (f"{', '.join(fields)} never reach{'es' if len(fields) == 1 else ''} the model: "
                 + ("the replayed audio_logits are empty " + str(next((b.model.audio_logits_shape for b, _, _ in direct
                                                                       if b.model is not None and b.model.audio_logits_shape),
                                                                      "[0, C, V]"))
                    if any(b.model is not None for b, _, _ in direct) else "the model would return audio_logits [0, C, V]")
                 + f" in {len(direct)} of {len(ev.batches)} batch{'es' if len(ev.batches) != 1 else ''}")
    else:
        b0 = numeric[0][0]
        title = (f"Your logged audio loss is not a loss: batch {b0.name} has {b0.stats['audio_targets']} audio targets "
                 f"and the checkpoint still guesses uniformly (audio CE {fmt(b0.model.audio_ce)}, uniform ln"
                 f"({b0.model.vocab_audio}) = {fmt(b0.model.uniform)}): audio_out_ids/label_audio_ids never reached the "
                 f"model in training")
    yield finding(
        Severity.CRITICAL, title, evidence=evidence,
        explanation="HiggsAudioModel substitutes an empty (num_codebooks, 0) tensor when audio_out_ids is missing and "
                    "returns audio_logits of shape [0, num_codebooks, codebook_size + 2]; no audio target reaches "
                    "the loss, a guard turns it into 0.0, and the model trains on text only. A dump of the collated "
                    "batch still holds the fields (the filter sits between the collator and the model): then the "
                    "logged 0.0 next to a checkpoint that never learned audio shows it.",
        fix="Pass audio_out_ids, audio_out_ids_start, audio_out_ids_start_group_loc and label_audio_ids to the model: "
            "no input whitelist in compute_loss that drops them, remove_unused_columns=False, and a loss that reports "
            "zero audio targets instead of 0.0 (higgs_diag.trainer.HiggsAudioTrainer).",
        metrics=("audio_loss",))


# ---- HD804 -------------------------------------------------------------------------------------------------
@check("HD804", "audio-over-masked", rank=1, scope="replay")
def replay_over_masked(ev: ReplayEvidence, t):
    """Replay: (nearly) every audio label of the batch is -100.

    What it detects: batches whose `label_audio_ids` hold no valid target (critical when that is most of the
    replayed batches), or more than `replay_masked_share` (95%) -100, or a codebook without any target while
    the others have some; per segment, how many segments have no target at all. No model needed.

    Why it happens: a segment whose `<|AUDIO_OUT|>` text label is -100 gets all its audio labels set to -100
    by boson's collator; the collator also writes -100 into the samples it is given, so a dataset that caches
    its sample tensors loses every audio label the second time a sample is collated; a wrong
    `start_index`/turn mask marks the assistant audio as context. The audio loss then has nothing to learn
    from (a guard logs 0.0, an unguarded mean NaN).

    Example: `step-000024.pt: all 4 x 52 audio labels are -100 (4 of 4 segments without a target);
    logged audio_loss 0.0`.

    Fix: copy samples before collating (`copy.deepcopy` or clone in `__getitem__`; `higgs_diag.trainer`
    guards the collator), check which turns are trained (`start_index`, the `<|AUDIO_OUT|>` text label), and
    never turn an audio loss without targets into 0.0.
    """
    zero, high, cb = [], [], []
    for b in ev.batches:
        st = b.stats
        pos = st.get("audio_positions", 0)
        if not pos:
            continue
        n_seg = st.get("n_segments", 0)
        seg0 = st.get("segments_without_targets", 0)
        logged = _logged(b, "audio_loss")
        tail = (f"; logged audio_loss {fmt(logged)}" if logged is not None else "")
        if st.get("audio_targets", 0) == 0:
            zero.append(f"{b.name}: all {' x '.join(map(str, b.shapes.get('label_audio_ids', [])))} audio labels are "
                        f"-100 ({seg0} of {n_seg} segments without a target){tail}")
        elif st.get("audio_masked_share", 0) > t.replay_masked_share:
            high.append(f"{b.name}: {_pct(st['audio_masked_share'])} of the audio labels are -100 (threshold "
                        f"{_pct(t.replay_masked_share)}; {st.get('audio_targets')} targets left, {seg0} of {n_seg} "
                        f"segments without a target){tail}")
        else:
            shares = st.get("audio_masked_share_per_codebook") or []
            empty_cb = [k for k, s in enumerate(shares) if s >= 1.0]
            if empty_cb and len(empty_cb) < len(shares):
                cb.append(f"{b.name}: codebook(s) {', '.join(map(str, empty_cb))} have no valid audio label while the "
                          f"others have")
    if not (zero or high or cb):
        return
    n = len(ev.batches)
    sev = Severity.CRITICAL if zero and len(zero) * 2 >= n else Severity.WARNING
    evidence = (zero + high + cb)[:6]
    if len(zero + high + cb) > 6:
        evidence.append(f"... and {len(zero + high + cb) - 6} more")
    if zero:
        title = f"Every audio label is -100 in {len(zero)} of {n} batch{'es' if n != 1 else ''}: no audio target reaches the loss"
    elif high:
        title = f"Over {_pct(t.replay_masked_share)} of the audio labels are -100 in {len(high)} of {n} batches"
    else:
        title = "Some codebooks have no audio target at all"
    yield finding(
        sev, title, evidence=evidence,
        explanation="The audio loss is a mean over the valid (not -100) audio labels; with none left it is undefined "
                    "(a guard logs 0.0, an unguarded mean NaN) and the model learns no audio from these batches. "
                    "boson's collator masks every segment whose <|AUDIO_OUT|> turn is not trained, and writes -100 "
                    "into the samples it is given, so cached samples lose their labels after the first epoch.",
        fix="Copy samples before collating (or use higgs_diag.trainer, which guards the collator), check which turns "
            "are trained, and report batches without audio targets instead of logging 0.0.",
        metrics=("audio_loss",))


# ---- HD805 -------------------------------------------------------------------------------------------------
@check("HD805", "eval-loss-missing", rank=8, scope="replay")
def replay_eval_loss(ev: ReplayEvidence, t):
    """Replay: with this run's args, model class and batch keys the Trainer logs no `eval_loss` (or raises).

    What it detects: transformers' own decision (4.45-4.46) reproduced: `label_names = args.label_names or
    find_labels(model class)`; `has_labels` when every label name is a key of the batch;
    `loss_without_labels` when `label_names` is empty and the model can return a loss (no Higgs class can).
    Without either, `prediction_step` computes no loss and `eval_loss` is missing. A `PeftModelForCausalLM`
    (adapter `task_type="CAUSAL_LM"`) passes `labels=` to `HiggsAudioModel.forward`, which raises TypeError.

    Why it happens: `HiggsAudioModel.forward` takes `label_ids` and `label_audio_ids`, so the default works
    for the bare model, but a `PeftModel` (task_type None) or a wrapper with `forward(**kwargs)` gives
    `label_names = []`, `PeftModelForCausalLM` gives `['labels']`, and a `label_names` naming a key the
    batch lacks gives `has_labels = False`. With `metric_for_best_model="eval_loss"` (or
    `load_best_model_at_end=True`) the Trainer then raises `KeyError: 'eval_loss'` at its first save.

    Example: `checkpoint: PEFT LoRA adapter (PeftModel); label_names=[] (default of PeftModel); batch keys
    label_ids, label_audio_ids, ...; metric_for_best_model eval_loss`.

    Fix: `label_names=["label_ids", "label_audio_ids"]` in TrainingArguments (a LoRA adapter with
    `task_type=None`), or a `prediction_step` that always computes the loss (`HiggsAudioTrainer`).
    """
    e = ev.eval
    if e is None or e.produced:
        return
    wants = e.best_metric is not None and e.best_metric.endswith("loss")
    sev = Severity.CRITICAL if (e.raises or wants) else Severity.WARNING
    if e.evaluation_configured is False and not wants and not e.raises:
        sev = Severity.INFO
    evidence = [f"model class implied by the checkpoint: {e.model_class}",
                f"label_names={e.label_names} ({e.label_names_from}); batch keys: {', '.join(e.batch_keys)}",
                f"has_labels={e.has_labels}, loss_without_labels={e.loss_without_labels} (can_return_loss=False)"]
    if e.best_metric:
        evidence.append(f"the best checkpoint is chosen by {e.best_metric!r}: the Trainer raises KeyError at its first "
                        f"save after an evaluation" if wants else f"metric_for_best_model resolves to {e.best_metric!r}")
    if e.evaluation_configured is False:
        evidence.append("eval_strategy is 'no' in the logged args: this matters once evaluation is turned on")
    evidence += [f"assumed: {a}" for a in e.assumptions]
    title = ("Evaluation raises TypeError: " + e.raises.split(": ", 1)[-1].split(" (")[0] if e.raises else
             f"eval_loss will not be produced: label_names={e.label_names} ({e.label_names_from})"
             + (f" but the batch has no {', '.join(e.missing_keys)}" if e.missing_keys and e.label_names else ""))
    yield finding(sev, title, evidence=evidence, explanation=e.reason, fix=e.fix, metrics=("eval_loss",))


# ---- HD806 -------------------------------------------------------------------------------------------------
@check("HD806", "config-mismatch", rank=2, scope="replay")
def replay_delay_pattern(ev: ReplayEvidence, t):
    """Replay: the batch was built with the delay pattern while the model config says otherwise, or the reverse.

    What it detects: the delay-pattern staircase (codebook k >= 1 still holding the stream BOS in the second
    column of every segment) present in `audio_out_ids` while `model_config.use_delay_pattern` is False, or
    absent while it is True.

    Why it happens: the collator is built with its own `use_delay_pattern` (community scripts pass False or
    forget it) while the model was configured and is generated with the other setting; the model then
    learns codebook alignments it will never see at inference.

    Example: `step-000100.pt: audio_out_ids built without the delay pattern while
    model.config.use_delay_pattern=True (config from checkpoint-100/config.json)`.

    Fix: build the collator with `use_delay_pattern=model.config.use_delay_pattern` (and the same
    `audio_num_codebooks`, stream BOS/EOS ids).
    """
    hits = [(b, b.issue("delay-pattern")) for b in ev.batches if b.issue("delay-pattern")]
    if not hits:
        return
    yield finding(
        Severity.CRITICAL,
        f"Delay pattern of the batches does not match the model config in {len(hits)} of {len(ev.batches)} batches",
        evidence=[f"{b.name}: {i['field']} {i['message']}" for b, i in hits[:4]]
                 + [f"model config from {ev.config_from}"],
        explanation="Higgs Audio generates with the delay pattern of its config; a collator built with the other "
                    "setting trains the codebooks at offsets the model never sees when it generates.",
        fix="Build the collator with use_delay_pattern=model.config.use_delay_pattern.")


# ---- HD807 -------------------------------------------------------------------------------------------------
@check("HD807", "non-finite", rank=2, scope="replay")
def replay_non_finite(ev: ReplayEvidence, t):
    """Replay: the checkpoint's logits are NaN or Inf on the saved batch.

    What it detects: non-finite values in `logits` or `audio_logits` of the replayed forward pass.

    Why it happens: the weights themselves became NaN (a NaN loss or gradient was applied: unguarded masked
    means over empty targets, fp16 overflow without loss scaling, a too-high learning rate); every later
    checkpoint is broken.

    Example: `step-000200.pt: audio_logits contain NaN/Inf; logits contain NaN/Inf`.

    Fix: go back to the last checkpoint whose replay is finite; fix the loss (no mean over zero targets),
    lower the learning rate or use bf16, keep `max_grad_norm` clipping.
    """
    hits = []
    for b in _with_model(ev):
        bad = [n for n, ok in (("logits", b.model.logits_finite), ("audio_logits", b.model.audio_logits_finite)) if not ok]
        if bad:
            hits.append(f"{b.name}: {' and '.join(bad)} contain NaN/Inf")
    if not hits:
        return
    yield finding(Severity.CRITICAL, "The checkpoint produces NaN/Inf logits: its weights are broken",
                  evidence=hits[:5],
                  explanation="Finite inputs through finite weights give finite logits; NaN or Inf here means the "
                              "weights already hold them (a NaN update was applied).",
                  fix="Resume from an earlier checkpoint whose replay is finite and fix the source of the NaN (a mean "
                      "over zero audio targets, fp16 overflow, too high a learning rate).")


# ---- HD808 -------------------------------------------------------------------------------------------------
@check("HD808", "loss-mismatch", rank=35, scope="replay")
def replay_loss_mismatch(ev: ReplayEvidence, t):
    """Replay: the loss logged for a batch matches neither the shifted nor the unshifted loss of that batch.

    What it detects: a batch with a loss logged for it (the dump's own losses, or the log entry of its step
    with `logging_steps=1`) whose `audio_loss` (or total `loss`) is more than `replay_match_factor` (1.5x)
    away from both recomputed losses, or exactly 0.0/NaN while the batch has audio targets and the model does
    predict audio. Findings that explain the value (unshifted loss, missing audio, masked labels) take
    precedence.

    Why it happens: the trainer's loss is computed differently from the dual loss (codebooks summed instead
    of averaged, a token-level mean, a different label tensor), a fallback replaced it with a constant, or the
    checkpoint, the batch and the logs come from different runs or steps.

    Example: `step-000200.pt: logged audio_loss 7.31 (batch dump) vs recomputed shifted 1.83, unshifted 4.97`.

    Fix: compute the loss with `higgs_diag.losses.dual_loss` (or `HiggsAudioTrainer`), remove fallbacks that
    write constants, and replay a batch with the checkpoint of the same step.
    """
    explained = {b.path for b in ev.batches if shift_vote(b, t)[0] == "unshifted"}
    hits = []
    for b in _with_model(ev):
        if b.logged is None or not b.logged.exact or b.path in explained or not b.stats.get("audio_targets"):
            continue
        m = b.model
        la = _logged(b, "audio_loss")
        if la is not None and m.audio_ce is not None:
            s, u = m.audio_ce, m.audio_ce_unshifted
            if la == 0.0 or (isinstance(la, float) and math.isnan(la)):
                if m.uniform and m.audio_ce < t.replay_uniform_fraction * m.uniform:
                    hits.append(f"{b.name}: logged audio_loss {fmt(la)} ({_where(b)}) although the batch has "
                                f"{b.stats['audio_targets']} audio targets and the shifted audio CE is {fmt(s)}")
                continue
            if min(_dist(la, s), _dist(la, u)) > math.log(t.replay_match_factor):
                hits.append(f"{b.name}: logged audio_loss {fmt(la)} ({_where(b)}) vs recomputed shifted {fmt(s)}, "
                            f"unshifted {fmt(u)}")
            continue
        lt = _finite_pos(_logged(b, "loss"))
        if lt is not None and m.total() is not None:
            tot, tot_u = m.total(), m.total(unshifted_audio=True)
            if min(_dist(lt, tot), _dist(lt, tot_u)) > math.log(t.replay_match_factor) and \
                    (m.text_ce is None or _dist(lt, m.text_ce) > math.log(t.replay_match_factor)):
                hits.append(f"{b.name}: logged loss {fmt(lt)} ({_where(b)}) vs recomputed text + audio: shifted "
                            f"{fmt(tot)}, unshifted {fmt(tot_u)}")
    if not hits:
        return
    yield finding(
        Severity.WARNING, f"The logged loss of {len(hits)} batch(es) matches neither the shifted nor the unshifted "
                          f"loss recomputed from the checkpoint",
        evidence=hits[:5],
        explanation="The replay recomputes the dual loss (text CE + mean of the per-codebook audio CEs) of each batch "
                    "with the checkpoint. A logged value far from both means the trainer computes something else, a "
                    "fallback wrote a constant, or checkpoint, batch and logs do not belong together.",
        fix="Compute the loss with higgs_diag.losses.dual_loss (or use HiggsAudioTrainer), remove constant fallbacks, "
            "and replay a batch saved at the checkpoint's step.")


# ---- HD809 -------------------------------------------------------------------------------------------------
@check("HD809", "batch-invalid", rank=30, scope="replay")
def replay_batch_framing(ev: ReplayEvidence, t):
    """Replay: audio segments framed differently from boson's collator, or no text labels.

    What it detects: segments whose first `audio_out_ids` column is not the stream BOS in every codebook or
    whose last column is not the stream EOS; segments whose first label column is not -100 (when the labels
    are not simply a copy of the inputs, see HD802); batches without `label_ids`.

    Why it happens: a custom collator or truncation cuts segments (losing BOS/EOS), pads them, or builds the
    labels without masking the BOS. The shift over the concatenated segments is only safe because column 0
    of every segment's labels is -100; otherwise the last frame of one segment is trained to predict the
    first label of the next.

    Example: `step-000100.pt: 2 of 4 segments do not end with the stream EOS (1025) in every codebook`.

    Fix: build batches with boson's `HiggsAudioSampleCollator` (segments `[BOS, codes, EOS]`, labels `[-100,
    codes, EOS]`), truncate whole segments, keep `label_ids` in the batch.
    """
    lines = []
    for b in ev.batches:
        for kind in ("stream-bos-eos", "unmasked-bos"):
            i = b.issue(kind)
            if i:
                lines.append(f"{b.name}: {i['field']} {i['message']}")
        if "label_ids" not in b.keys:
            lines.append(f"{b.name}: no label_ids: the text loss cannot be computed")
    if not lines:
        return
    yield finding(Severity.WARNING, "Audio segments or labels are not framed like boson's collator builds them",
                  evidence=lines[:6],
                  explanation="Each output segment is [stream BOS, codes, stream EOS] with labels [-100, codes, EOS]; "
                              "the one-position shift over the concatenated segments relies on that -100.",
                  fix="Build batches with HiggsAudioSampleCollator, truncate whole segments and keep label_ids.")


# The replay names the cause behind what the logs show.
causes("HD201", "HD801", "HD802", "HD804", "HD803")
causes("HD202", "HD803", "HD804")
causes("HD203", "HD804", "HD803")
causes("HD101", "HD805")
causes("HD808", "HD807", "HD801", "HD803", "HD804")
causes("HD805", "HD803")
