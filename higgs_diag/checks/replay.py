"""Replay rules on the losses (HD800, HD801, HD808): what the checkpoint computes on a saved batch against
what the run logged for it.

These run on what the replay measured (a :class:`higgs_diag.evidence.ReplayEvidence`: per-batch label
statistics, shifted and unshifted cross-entropies, copy rates, the losses the run logged); ``higgs-diag
analyze RUN --replay`` judges them together with the log rules. No torch here: the numbers are plain data.
"""
from __future__ import annotations

import math

from ..diagnosis import Severity
from ..evidence import ReplayEvidence
from . import causes, check, finding
from ._replay_util import Vote, losses_of, dist, finite_pos, logged_value, pairing, pct, shift_vote, where, with_model
from ._util import fmt

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
                    f"({pct(1 - tot / pos) if pos else 'n/a'} -100), {txt} valid text targets")
    m = ev.model
    title = f"Checked {n} batch{'es' if n != 1 else ''} without the model"
    if m is None:
        ev_lines.append("--no-model: only the batch checks ran (the trainer's batch validation, label masking, labels "
                        "equal to inputs, delay pattern, BOS/EOS framing); replay through the checkpoint for the loss "
                        "comparisons")
    if m is not None:
        if m.audio_ce is not None:
            per = ", ".join(fmt(x) for x in m.audio_ce_per_cb if x is not None)
            ev_lines.append(f"audio CE shifted {fmt(m.audio_ce)} (per codebook {per}), unshifted "
                            f"{fmt(m.audio_ce_unshifted)}, uniform guess ln({m.vocab_audio}) = {fmt(m.uniform)}")
            ev_lines.append(f"audio copy rate {pct(m.audio_copy_rate)} (argmax == current input token; the data "
                            f"repeats its last token at {pct(m.audio_repeat_rate)}), top-1 accuracy "
                            f"{pct(m.audio_accuracy)}")
        elif m.audio_logits_shape:
            ev_lines.append(f"audio_logits shape {m.audio_logits_shape}: no audio cross-entropy to compute")
        if m.text_ce is not None:
            ev_lines.append(f"text CE shifted {fmt(m.text_ce)} over {m.n_text} targets, unshifted "
                            f"{fmt(m.text_ce_unshifted)}; text copy rate {pct(m.text_copy_rate)} (repeat rate "
                            f"{pct(m.text_repeat_rate)})")
        sec = sum(b.model.forward_seconds for b in with_model(ev))
        chk = sum(b.model.check_seconds for b in with_model(ev))
        ev_lines.append(f"forward {sec:.3g} s, checks {chk:.3g} s ({ev.device}, {ev.dtype}"
                        + (f", {ev.world_size} ranks" if ev.world_size > 1 else "") + ")")
        title = (f"Replayed {n} batch{'es' if n != 1 else ''} through the checkpoint: shifted audio CE "
                 f"{fmt(m.audio_ce)} vs uniform {fmt(m.uniform)}, unshifted {fmt(m.audio_ce_unshifted)}"
                 if m.audio_ce is not None else f"Replayed {n} batch{'es' if n != 1 else ''} through the checkpoint")
    for b in ev.batches[:4]:
        if b.logged is not None:
            vals = ", ".join(f"{k} {fmt(v)}" for k, v in b.logged.values.items() if not k.startswith("audio_loss_cb"))
            ev_lines.append(f"logged for {b.name}: {vals} ({where(b)})")
    if ev.eval is not None:
        e = ev.eval
        ev_lines.append("eval_loss: " + ("produced" if e.produced else "raises" if e.raises else "not produced")
                        + f" (label_names={e.label_names} from {e.label_names_from}, model class {e.model_class})")
    yield finding(Severity.INFO, title, evidence=ev_lines)


# ---- HD801 -------------------------------------------------------------------------------------------------
def aggregate(votes: list[Vote]) -> Severity | None:
    """The stated rule: a finding's severity comes from all batches together. Critical when the batches that
    can tell mostly say "unshifted" and either all of them do or at least two do; warning on a tie; info when
    they mostly say "shifted" (the dissent is shown, it makes no finding on its own)."""
    n_u = sum(v.verdict == "unshifted" for v in votes)
    n_s = sum(v.verdict == "shifted" for v in votes)
    if n_u == 0:
        return None
    if n_u > n_s and (n_s == 0 or n_u >= 2):
        return Severity.CRITICAL
    return Severity.WARNING if n_u >= n_s else Severity.INFO


@check("HD801", "audio-labels-unshifted", rank=1, scope="replay",
       thresholds=("replay_separation_factor", "replay_exact_tolerance", "replay_copy_margin", "replay_uniform_fraction",
                   "replay_internal_separation", "replay_pair_max_steps", "replay_pair_max_change"))
def replay_unshifted(ev: ReplayEvidence, t):
    """Replay: the trainer computes the loss without the one-position shift (the copy task).

    What it detects: per batch, one of two readings. (1) When the batch's logged loss can be compared with what
    its checkpoint computes (the checkpoint of the batch's own step, or at most `replay_pair_max_steps` (20)
    steps older while the logged loss moved less than `replay_pair_max_change` (10%)): the logged `audio_loss`
    (or, when only the total `loss` is logged, the total minus the text CE the replay computed on the same
    batch) matches the *unshifted* cross-entropy `CE(audio_logits[:, k], label_audio_ids[k, :])` rather than the
    shifted one, the two being at least `replay_separation_factor` (2x) apart, or, through the checkpoint of the
    batch's own step, the logged value lying within `replay_exact_tolerance` (0.5%) of one and more than twice
    that from the other (a mild collapse: LoRA, early in training). (2) Otherwise, the checkpoint's own numbers:
    its argmax equals the *current* input code at least `replay_copy_margin` (25 points) more often than the
    data repeats its last code (stream BOS/EOS and delay fills excluded), with the same-position CE below the
    next-token CE; or its next-token CE is at least
    `replay_uniform_fraction` (90%) of the uniform guess ln(codebook_size + 2) while the same-position CE is
    `replay_internal_separation` (1.25x) lower. The same for the text loss. The batches are then combined:
    critical when those that can tell mostly say "unshifted" (all of them, or at least two); a tie is a
    warning, a minority an info finding; the evidence lists every batch's reading.

    Why it happens: boson_multimodal aligns `label_audio_ids` with `audio_out_ids` (same positions: the label
    at t is the input at t) and computes no loss itself. A hand-written loss that does not shift scores every
    position against its own input, so the model learns to copy and the loss collapses (to ~0.003 on a full
    fine-tune; slowly with LoRA) while the correctly shifted loss of the same weights is no better than a
    uniform guess (boson-ai/higgs-audio#94). A logged loss is only compared through the weights that produced
    it: a batch dumped at step 1 was scored by the base weights, not by the last checkpoint.

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
        votes = [v for v in (shift_vote(b, ev, t, part) for b in with_model(ev)) if v.verdict is not None]
        sev = aggregate(votes)
        if sev is not None:
            found[part] = (sev, votes)
    if not found:
        return
    sev = max(s for s, _ in found.values())
    evidence, parts = [], []
    for part, (psev, votes) in found.items():
        parts.append(part)
        un = sorted((v for v in votes if v.verdict == "unshifted"), key=lambda v: (v.basis != "logged", v.closeness))
        sh = [v for v in votes if v.verdict == "shifted"]
        n_all = len(with_model(ev))
        evidence.append(f"{part}: {len(un)} of {n_all} replayed batch(es) read as unshifted, {len(sh)} as shifted"
                        + (f", {n_all - len(votes)} gave no reading" if n_all > len(votes) else ""))
        evidence += [v.line for v in un[:4]] + [v.line for v in sh[:2]]
    m = ev.model
    if m is not None and m.audio_ce is not None:
        evidence.append(f"audio CE over all replayed batches: shifted {fmt(m.audio_ce)} (per codebook "
                        f"{', '.join(fmt(x) for x in m.audio_ce_per_cb if x is not None)}), unshifted "
                        f"{fmt(m.audio_ce_unshifted)}, uniform guess ln({m.vocab_audio}) = {fmt(m.uniform)}; copy rate "
                        f"{pct(m.audio_copy_rate)} (the data repeats its last token at {pct(m.audio_repeat_rate)})")
    part0 = parts[0]
    lead = sorted((v for v in found[part0][1] if v.verdict == "unshifted"),
                  key=lambda v: (v.basis != "logged", v.closeness))[0]
    bm = lead.batch.model
    s, u = losses_of(bm, part0)
    if lead.basis == "logged":
        title = (f"The logged loss of {lead.batch.name} matches the unshifted cross-entropy ({fmt(u)}), not the "
                 f"shifted one ({fmt(s)}): the trainer computes the {' and '.join(parts)} loss without the "
                 f"one-position shift")
    else:
        copy = bm.audio_copy_rate if part0 == "audio" else bm.text_copy_rate
        rep = bm.audio_repeat_rate if part0 == "audio" else bm.text_repeat_rate
        title = (f"The checkpoint copies its input ({pct(copy)} of positions, the data repeats at {pct(rep)}; "
                 f"same-position CE {fmt(u)} < next-token CE {fmt(s)}): it was trained on the {' and '.join(parts)} "
                 f"loss without the one-position shift")
    if sev < Severity.CRITICAL:
        title = "Some replayed batches read as unshifted, the others do not: " + title[0].lower() + title[1:]
    yield finding(sev, title, evidence=evidence, metrics=("audio_loss",))


# ---- HD808 -------------------------------------------------------------------------------------------------
@check("HD808", "loss-mismatch", rank=35, scope="replay",
       thresholds=("replay_match_factor", "replay_uniform_fraction", "replay_pair_max_steps", "replay_pair_max_change"))
def replay_loss_mismatch(ev: ReplayEvidence, t):
    """Replay: the loss logged for a batch matches neither the shifted nor the unshifted loss of that batch.

    What it detects: a batch with a loss logged for it (the dump's own losses, or the log entry of its step)
    that can be compared with its checkpoint (the same pairing as HD801: the checkpoint of the batch's step or
    a slightly older one while the loss held) whose `audio_loss` (or total `loss`) is more than
    `replay_match_factor` (1.5x) away from both recomputed losses, or exactly 0.0/NaN while the batch has audio
    targets and the model does predict audio. Findings that explain the value (unshifted loss, missing audio,
    masked labels) take precedence.

    Why it happens: the trainer's loss is computed differently from the dual loss (codebooks summed instead
    of averaged, a token-level mean, a different label tensor), a fallback replaced it with a constant, or the
    checkpoint, the batch and the logs come from different runs or steps.

    Example: `step-000200.pt: logged audio_loss 7.31 (batch dump) vs recomputed shifted 1.83, unshifted 4.97`.

    Fix: compute the loss with `higgs_diag.losses.dual_loss` (or `HiggsAudioTrainer`), remove fallbacks that
    write constants, and replay a batch with the checkpoint of the same step.
    """
    hits = []
    for b in with_model(ev):
        if not b.stats.get("audio_targets") or not pairing(b, ev, t)[0] \
                or shift_vote(b, ev, t).verdict == "unshifted":
            continue
        m = b.model
        la = logged_value(b, "audio_loss")
        if la is not None and m.audio_ce is not None:
            s, u = m.audio_ce, m.audio_ce_unshifted
            if la == 0.0 or (isinstance(la, float) and math.isnan(la)):
                if m.uniform and m.audio_ce < t.replay_uniform_fraction * m.uniform:
                    hits.append(f"{b.name}: logged audio_loss {fmt(la)} ({where(b)}) although the batch has "
                                f"{b.stats['audio_targets']} audio targets and the shifted audio CE is {fmt(s)}")
                continue
            if min(dist(la, s), dist(la, u)) > math.log(t.replay_match_factor):
                hits.append(f"{b.name}: logged audio_loss {fmt(la)} ({where(b)}) vs recomputed shifted {fmt(s)}, "
                            f"unshifted {fmt(u)}")
            continue
        lt = finite_pos(logged_value(b, "loss"))
        if lt is not None and m.total() is not None:
            tot, tot_u = m.total(), m.total(unshifted_audio=True)
            if min(dist(lt, tot), dist(lt, tot_u)) > math.log(t.replay_match_factor) and \
                    (m.text_ce is None or dist(lt, m.text_ce) > math.log(t.replay_match_factor)):
                hits.append(f"{b.name}: logged loss {fmt(lt)} ({where(b)}) vs recomputed text + audio: shifted "
                            f"{fmt(tot)}, unshifted {fmt(tot_u)}")
    if not hits:
        return
    yield finding(
        Severity.WARNING, f"The logged loss of {len(hits)} batch(es) matches neither the shifted nor the unshifted "
                          f"loss recomputed from the checkpoint",
        evidence=hits[:5])


# ---- HD811 -------------------------------------------------------------------------------------------------
@check("HD811", "no-learning", rank=0, scope="replay")
def replay_weights_unchanged(ev: ReplayEvidence, t):
    """Replay: the checkpoints' trainable weights never changed: no update was ever applied.

    What it detects: from the checkpoint files themselves (raw safetensors bytes, nothing loaded into a model):
    two or more checkpoints of the run whose trainable tensors are byte-identical (all LoRA tensors of an
    adapter or a wrapper state dict; a sample of every tensor of a full model), or a LoRA checkpoint whose
    `lora_B` matrices are all still exactly zero (their initial value: the adapter is a no-op).

    Why it happens: an optimizer step changes every trainable tensor that received a gradient. Identical
    checkpoints, or LoRA B matrices still at zero after many steps, mean no gradient ever reached them: a
    `training_step` override that returns the loss without calling `backward()` (`grad_norm` is then exactly
    0), a loss detached from the graph (`torch.tensor(loss.item())`, a loss rebuilt from floats), a learning
    rate of 0, or parameters frozen by mistake (`requires_grad=False` on the adapter). While no weight moves,
    nothing about the data or the loss formula matters yet: fix this first.

    Example: `checkpoint-50 and checkpoint-100: identical LoRA tensors (36 tensors); all 18 lora_B matrices of
    checkpoint-100 are zero`.

    Fix: call `self.accelerator.backward(loss)` (or `loss.backward()`) in any `training_step` override, or do
    not override it (`HiggsAudioTrainer` computes the loss in `compute_loss` only); keep the loss a tensor of
    the graph; check `learning_rate > 0` and that the adapter's parameters require gradients
    (`model.print_trainable_parameters()`).
    """
    ws = [w for w in ev.weights if w.step is not None]
    ws.sort(key=lambda w: w.step)
    evidence, steps = [], []
    same = [(a, b) for a, b in zip(ws, ws[1:]) if a.digest == b.digest and a.n_tensors]
    for a, b in same:
        evidence.append(f"{a.checkpoint} (step {a.step}) and {b.checkpoint} (step {b.step}): identical trainable "
                        f"tensors ({a.n_tensors} tensors{', first bytes of each compared' if a.sampled else ''})")
        steps += [a.step, b.step]
    zero = [w for w in ev.weights if w.lora_b_tensors and w.lora_b_zero == w.lora_b_tensors and (w.step or 0) > 0]
    for w in zero:
        evidence.append(f"{w.checkpoint}: all {w.lora_b_tensors} lora_B matrices are exactly zero at step {w.step} "
                        f"(their initial value)")
        steps.append(w.step or 0)
    if not evidence:
        return
    yield finding(Severity.CRITICAL, "The trainable weights never changed between checkpoints: no update was applied"
                  if same else "Every LoRA B matrix is still zero: the adapter never received an update",
                  evidence=evidence, steps=(min(steps), max(steps)), metrics=("grad_norm",))


# ---- HD810 -------------------------------------------------------------------------------------------------
@check("HD810", "replay-summary", rank=98, scope="replay")
def replay_skipped(ev: ReplayEvidence, t):
    """Replay was asked for, but there was nothing to replay: the report rests on the logs alone.

    What it detects: `analyze --replay` on a run without a loadable checkpoint (it crashed before its first
    save, or the checkpoint folders hold only the optimizer state) or without batch files (no
    `higgs-diag/batches/` or `batches/` folder, no `--batches`).

    Why it happens: a replay needs weights the run produced and batches it trained on. Checkpoints appear
    every `save_steps`; batch dumps come from `higgs_diag.trainer`'s `AudioLossMonitor` (on its first critical
    alert) or from your own `higgs_diag.batch.save_batch(path, batch)` calls. The log findings stand on their
    own.

    Example: `replay skipped: out/: no batch files in out/higgs-diag/batches or out/batches; pass --batches PATH`.

    Fix: save a batch with `higgs_diag.batch.save_batch(path, batch, meta={"step": step})` (or train with
    `higgs_diag.trainer.HiggsAudioTrainer` and its monitor), keep a checkpoint (`save_steps`, a
    `save_total_limit` of at least 2), then rerun with `--replay`, `--batches PATH` or `--checkpoint PATH`.
    """
    if ev.skipped:
        yield finding(Severity.INFO, "Replay skipped: nothing to replay, the report rests on the logs alone",
                      evidence=[ev.skipped])


causes("HD811", "HD401")
causes("HD201", "HD801", "HD802", "HD812", "HD804", "HD803")
causes("HD204", "HD801", "HD802", "HD812", "HD804", "HD803")
causes("HD202", "HD803", "HD804")
causes("HD203", "HD804", "HD803")
causes("HD101", "HD805")
causes("HD808", "HD807", "HD801", "HD803", "HD804")
causes("HD805", "HD803")
