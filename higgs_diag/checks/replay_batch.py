"""Replay rules on the batch and the model's outputs (HD802-HD807, HD809): labels, masks, missing fields,
the delay pattern, non-finite logits and the eval_loss decision. Plain data, no torch.
"""
from __future__ import annotations

import math

from ..diagnosis import Severity
from ..evidence import ReplayEvidence
from . import check, finding
from ._replay_util import dist, finite_pos, logged_value, pairing, pct, where, with_model
from ._util import fmt

AUDIO_FIELDS = ("audio_out_ids", "audio_out_ids_start", "audio_out_ids_start_group_loc", "label_audio_ids")

# ---- HD802 -------------------------------------------------------------------------------------------------
@check("HD802", "audio-labels-are-inputs", rank=2, scope="replay")
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
        metrics=("audio_loss",))


# ---- HD803 -------------------------------------------------------------------------------------------------
@check("HD803", "audio-out-missing", rank=0, scope="replay", thresholds=("replay_uniform_fraction",))
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
        la, lt = logged_value(b, "audio_loss"), finite_pos(logged_value(b, "loss"))
        unlearned = m.audio_ce >= t.replay_uniform_fraction * m.uniform
        zero_or_nan = la is not None and (la == 0.0 or (isinstance(la, float) and math.isnan(la)))
        text_only = la is None and lt is not None and m.text_ce is not None and \
            dist(lt, m.text_ce) < dist(lt, m.total()) and pairing(b, ev, t)[0]
        if unlearned and (zero_or_nan or text_only):
            what = f"logged audio_loss {fmt(la)}" if zero_or_nan else f"logged loss {fmt(lt)} equals the text CE {fmt(m.text_ce)}"
            numeric.append((b, f"{b.name}: {what} ({where(b)}) although the batch has {b.stats['audio_targets']} valid "
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
        metrics=("audio_loss",))


# ---- HD804 -------------------------------------------------------------------------------------------------
@check("HD804", "audio-over-masked", rank=1, scope="replay", thresholds=("replay_masked_share",))
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
        logged = logged_value(b, "audio_loss")
        tail = (f"; logged audio_loss {fmt(logged)}" if logged is not None else "")
        if st.get("audio_targets", 0) == 0:
            zero.append(f"{b.name}: all {' x '.join(map(str, b.shapes.get('label_audio_ids', [])))} audio labels are "
                        f"-100 ({seg0} of {n_seg} segments without a target){tail}")
        elif st.get("audio_masked_share", 0) > t.replay_masked_share:
            high.append(f"{b.name}: {pct(st['audio_masked_share'])} of the audio labels are -100 (threshold "
                        f"{pct(t.replay_masked_share)}; {st.get('audio_targets')} targets left, {seg0} of {n_seg} "
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
        title = f"Over {pct(t.replay_masked_share)} of the audio labels are -100 in {len(high)} of {n} batches"
    else:
        title = "Some codebooks have no audio target at all"
    yield finding(
        sev, title, evidence=evidence,
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
    if e.reason:
        evidence.append(e.reason)
    yield finding(sev, title, evidence=evidence, fix_detail=f"For this run: {e.fix}." if e.fix else "",
                  metrics=("eval_loss",))


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
                 + [f"model config from {ev.config_from}"])


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
    for b in with_model(ev):
        bad = [n for n, ok in (("logits", b.model.logits_finite), ("audio_logits", b.model.audio_logits_finite)) if not ok]
        if bad:
            hits.append(f"{b.name}: {' and '.join(bad)} contain NaN/Inf")
    if not hits:
        return
    yield finding(Severity.CRITICAL, "The checkpoint produces NaN/Inf logits: its weights are broken",
                  evidence=hits[:5])


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
                  evidence=lines[:6])



# ---- HD812 -------------------------------------------------------------------------------------------------
@check("HD812", "audio-target-leak", rank=3, scope="replay")
def replay_audio_target_leak(ev: ReplayEvidence, t):
    """Replay: a sample's reference (input) audio contains its own target audio.

    What it detects: from the batch alone: an output segment (`audio_out_ids`, the codes the model must
    generate) whose codes appear inside an input segment (`audio_in_ids`, the reference audio of a `<|AUDIO|>`
    turn) of the same sample. Codebook 0 is compared without the stream BOS/EOS (the delay pattern leaves it in
    place); targets shorter than 4 frames are not judged.

    Why it happens: a zero-shot voice-cloning dataset built with the target utterance as its own reference
    (the reference clip chosen from the same file, or the same `audio_ids` index used for the user turn and
    the assistant turn). The model can then copy its input from the reference across the sequence instead of
    learning to speak: the loss falls fast, the shift is right, and generation from a different reference
    fails.

    Example: `step-000070.pt: sample 0: output segment 0 (12 frames) appears in input segment 0; 4 of 4
    samples`.

    Fix: pick the reference audio from another utterance of the same speaker (never the target itself), and
    check the dataset with `higgs-diag replay-batch --no-model` on a batch dump.
    """
    hits, n_out = [], 0
    for b in ev.batches:
        leaks = b.stats.get("target_leaks") or []
        n_out += b.stats.get("n_segments", 0) or 0
        for row, out_seg, in_seg, frames in leaks[:3]:
            hits.append(f"{b.name}: sample {row}: output segment {out_seg} ({frames} frames) appears in its input "
                        f"(reference) segment {in_seg}")
        if len(leaks) > 3:
            hits.append(f"{b.name}: ... {len(leaks) - 3} more leaking segments")
    n_leak = sum(len(b.stats.get("target_leaks") or []) for b in ev.batches)
    if not n_leak:
        return
    sev = Severity.CRITICAL if n_out and n_leak * 2 >= n_out else Severity.WARNING
    yield finding(sev, f"The target audio is in the sample's own reference audio in {n_leak} of {n_out} output "
                       f"segments: the model can copy it instead of learning to speak",
                  evidence=hits[:8], metrics=("audio_loss",))


# ---- HD813 -------------------------------------------------------------------------------------------------
@check("HD813", "text-labels-misaligned", rank=4, scope="replay",
       thresholds=("replay_separation_factor", "replay_pair_max_steps", "replay_pair_max_change"))
def replay_text_labels_misaligned(ev: ReplayEvidence, t):
    """Replay: the text loss is computed against labels that do not line up with the logits.

    What it detects: with a batch whose logged `text_loss` can be compared with its checkpoint (the pairing of
    HD801): the logged value matches the cross-entropy against the collator's *unexpanded* `label_ids`
    (truncated to the shorter length, shifted or not) rather than the correct `CE(logits[:, :-1],
    expanded_labels[:, 1:])`, the two being at least `replay_separation_factor` (2x) apart, in a batch whose
    audio spans make the expanded sequence longer than `input_ids`. Also a forward whose `expanded_labels` are
    missing or not as long as the logits.

    Why it happens: `HiggsAudioModel.forward` merges the audio features into the sequence, so `logits` are
    longer than `input_ids` by every audio span, and it returns `expanded_labels` aligned with them. A trainer
    that pops `label_ids` from the inputs (so the model gets none) and compares the logits with the collator's
    `label_ids` trims or pads one to the other: after the first audio span every text target sits at the
    wrong position, and the text head learns noise.

    Example: `step-000070.pt: logged text_loss 4.91 matches the CE against the unexpanded label_ids (4.87), not
    the expanded one (0.62); the audio spans add 48 positions`.

    Fix: pass `label_ids` to the model and compute the text loss against `outputs.expanded_labels`:
    `CE(logits[:, :-1], expanded_labels[:, 1:])` with `ignore_index=-100` (`higgs_diag.losses.dual_loss`, or
    `higgs_diag.trainer.HiggsAudioTrainer`).
    """
    hits = []
    for b in with_model(ev):
        m = b.model
        if m.expanded_labels_missing:
            hits.append(f"{b.name}: the forward returned no expanded_labels as long as the logits")
            continue
        lt = finite_pos(logged_value(b, "text_loss"))
        variants = [x for x in (m.text_ce_unexpanded, m.text_ce_unexpanded_same) if x is not None]
        if lt is None or m.text_ce is None or not variants or m.text_expansion <= 0 or not pairing(b, ev, t)[0]:
            continue
        wrong = min(variants, key=lambda x: dist(lt, x))
        if dist(wrong, m.text_ce) >= math.log(t.replay_separation_factor) and dist(lt, wrong) < dist(lt, m.text_ce):
            hits.append(f"{b.name}: logged text_loss {fmt(lt)} ({where(b)}) matches the CE against the unexpanded "
                        f"label_ids ({fmt(wrong)}), not the expanded one ({fmt(m.text_ce)}); the audio spans add "
                        f"{m.text_expansion} positions")
    if not hits:
        return
    yield finding(Severity.CRITICAL, "The text loss is computed against label_ids that do not line up with the "
                                     "logits (not the model's expanded_labels)",
                  evidence=hits[:6], metrics=("text_loss",))
