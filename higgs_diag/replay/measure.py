"""One forward pass of one batch under ``torch.inference_mode`` and the numbers the model checks need.

The audio losses come from ``higgs_diag.losses.dual_loss`` (the trainer's own implementation), shifted and
unshifted. The text losses use the same formula, CE(logits[:, t], label[t + 1]) averaged over valid targets,
but index the target rows first so that a 128k-vocabulary logits tensor is never copied whole to float32.
Copy rates: how often the argmax at a position equals the input code *at that position* (what a model trained
without the shift learns), next to how often the next target really equals the current input (the data's own
repeat rate), both over the positions the shifted loss scores whose current input is a real code (not a stream
BOS/EOS or delay fill).
"""
from __future__ import annotations

import inspect
import time
from typing import Any

import torch
import torch.nn.functional as F

from ..batch import FIELDS, IGNORE_INDEX
from ..losses import dual_loss, scored_text_positions
from .errors import ReplayError
from ..evidence import ModelRecord


def forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set(FIELDS)


def model_inputs(batch: dict[str, torch.Tensor], params: set[str], device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        if k not in FIELDS or k not in params:
            continue
        v = v.to(device, non_blocking=True)
        if v.dtype.is_floating_point:
            v = v.to(dtype)
        out[k] = v
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward(model, inputs: dict[str, torch.Tensor], device: torch.device, path: str):
    try:
        with torch.inference_mode():
            return model(**inputs)
    except Exception as e:  # a batch the validation let through but the model rejects
        raise ReplayError(f"{path}: the model cannot run this batch ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None


def _text(rec: ModelRecord, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None) -> None:
    rows, y, valid = scored_text_positions(logits, labels)
    n = int(y.numel())
    rec.n_text = n
    if n:
        rows = rows.float()
        rec.text_ce_sum = float(F.cross_entropy(rows, y, reduction="sum"))
        pred = rows.argmax(-1)
        rec.text_correct = int((pred == y).sum())
        if ids is not None and ids.shape == labels.shape:
            cur = ids[:, :-1][valid]
            rec.text_copy = int((pred == cur).sum())
            rec.text_repeat = int((y == cur).sum())
    rows_u, y_u, _ = scored_text_positions(logits, labels, unshifted=True)
    rec.n_text_unshifted = int(y_u.numel())
    if rec.n_text_unshifted:
        rec.text_ce_unshifted_sum = float(F.cross_entropy(rows_u.float(), y_u, reduction="sum"))


def _text_unexpanded(rec: ModelRecord, logits: torch.Tensor, raw: torch.Tensor) -> None:
    """The text CE against the collator's label_ids as they are (not expanded over the audio spans), both
    shifted and at the same position, over the first min(T_labels, T_logits) positions: what a trainer that pops
    ``label_ids`` and ignores ``expanded_labels`` computes."""
    if raw.dim() != 2 or raw.shape[0] != logits.shape[0]:
        return
    n = min(raw.shape[1], logits.shape[1])
    rec.text_expansion += int(logits.shape[1] - raw.shape[1])
    for unshifted in (False, True):
        rows, y, _ = scored_text_positions(logits[:, :n], raw[:, :n], unshifted=unshifted)
        if not y.numel():
            continue
        ce = float(F.cross_entropy(rows.float(), y, reduction="sum"))
        if unshifted:
            rec.n_text_unexpanded_same, rec.text_ce_unexpanded_same_sum = int(y.numel()), ce
        else:
            rec.n_text_unexpanded, rec.text_ce_unexpanded_sum = int(y.numel()), ce


def _audio(rec: ModelRecord, al: torch.Tensor, labels: torch.Tensor | None, ids: torch.Tensor | None) -> None:
    n_pos, n_cb, _v = al.shape
    if n_pos == 0:
        return
    if labels is not None and labels.dim() == 2 and labels.shape == (n_cb, n_pos):
        for unshifted in (False, True):
            res = dual_loss(None, None, al, labels, unshifted=unshifted)
            losses = [float(x) for x in res.codebook_losses.tolist()]
            counts = list(res.n_audio_targets_per_codebook)
            sums = [x * c if c else 0.0 for x, c in zip(losses, counts)]
            if unshifted:
                rec.n_audio_unshifted_per_cb, rec.audio_ce_unshifted_sum_per_cb = counts, sums
            else:
                rec.n_audio_per_cb, rec.audio_ce_sum_per_cb = counts, sums
        valid = (labels[:, 1:] != IGNORE_INDEX).t()  # [N-1, C]: positions the shifted loss scores
        nxt = labels[:, 1:].t()
    else:
        valid = torch.ones((n_pos - 1, n_cb), dtype=torch.bool, device=al.device)
        nxt = None
    if ids is None or ids.shape != (n_cb, n_pos) or n_pos < 2:
        return
    pred = al[:-1].argmax(-1)  # [N-1, C]
    cur = ids[:, :-1].t()
    # copying is judged on real codes: a stream BOS/EOS or a delay fill (ids >= codebook_size) repeats by
    # construction and says nothing about what the model learned
    valid = valid & (cur < al.shape[-1] - 2)
    copy = (pred == cur) & valid
    rec.audio_positions = int(valid.sum())
    rec.audio_positions_per_cb = valid.sum(0).tolist()
    rec.audio_copy = int(copy.sum())
    rec.audio_copy_per_cb = copy.sum(0).tolist()
    if nxt is not None:
        rec.audio_repeat = int(((nxt == cur) & valid).sum())
        rec.audio_correct = int(((pred == nxt) & valid).sum())


def measure(model, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, path: str,
            params: set[str] | None = None) -> ModelRecord:
    """Forward one batch and compute the model checks' numbers."""
    inputs = model_inputs(batch, params or forward_params(model), device, dtype)
    _sync(device)
    t0 = time.perf_counter()
    out = forward(model, inputs, device, path)
    _sync(device)
    t1 = time.perf_counter()
    rec = checks_on_outputs(out, inputs)
    _sync(device)
    rec.forward_seconds, rec.check_seconds = t1 - t0, time.perf_counter() - t1
    return rec


def _finite_rows(logits: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None) -> bool:
    """Are the text logits finite? Checked (all vocabulary columns) at the rows the losses score and at each
    sequence's last attended position, which attends to every token before it: NaN/Inf weights show there. A
    full pass over a [B, T, 128k] tensor would cost a third of the forward pass on CPU."""
    b, t = logits.shape[:2]
    rows = torch.zeros((b, t), dtype=torch.bool, device=logits.device)
    if labels is not None and labels.shape == (b, t):
        rows |= labels != IGNORE_INDEX
    if mask is not None and mask.shape == (b, t):
        last = (mask.long().sum(1) - 1).clamp(min=0)
    else:
        last = torch.full((b,), t - 1, dtype=torch.long, device=logits.device)
    rows[torch.arange(b, device=logits.device), last] = True
    return bool(torch.isfinite(logits[rows]).all())


def checks_on_outputs(out: Any, inputs: dict[str, torch.Tensor]) -> ModelRecord:
    get = out.get if isinstance(out, dict) else (lambda k: getattr(out, k, None))
    rec = ModelRecord()
    with torch.inference_mode():
        logits, labels, ids = get("logits"), get("expanded_labels"), get("expanded_input_ids")
        al = get("audio_logits")
        if logits is not None:
            rec.logits_finite = _finite_rows(logits, labels, get("attention_mask"))
            if labels is not None and labels.shape == logits.shape[:2]:
                _text(rec, logits, labels, ids)
            else:
                rec.expanded_labels_missing += 1
            raw = inputs.get("label_ids")
            if raw is not None:
                _text_unexpanded(rec, logits, raw)
        if al is not None:
            rec.audio_logits_shape = list(al.shape)
            rec.vocab_audio = int(al.shape[-1])
            rec.audio_logits_finite = bool(torch.isfinite(al).all())
            _audio(rec, al, inputs.get("label_audio_ids"), inputs.get("audio_out_ids"))
    return rec
