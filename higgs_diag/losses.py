"""The Higgs Audio v2 dual loss: shifted text cross-entropy + per-codebook shifted audio cross-entropy.

This is the one implementation used by the fixture runs, the trainer and replay. It imports torch only.

``HiggsAudioModel.forward`` (boson_multimodal 0.1.1) computes no loss. It returns ``logits`` ``[B, T, vocab]``
with ``expanded_labels`` ``[B, T]`` (audio positions already -100), and ``audio_logits`` ``[N, C, V]`` for the
N audio-out positions of the whole batch (segments concatenated in batch order), whose labels are the
collator's ``label_audio_ids`` ``[C, N]``. Labels are aligned with their *inputs*, nothing is pre-shifted, so
the logits at position ``i`` must be scored against the label at ``i + 1``:

* text:  ``CE(logits[:, :-1], expanded_labels[:, 1:])``
* audio: for every codebook ``k``: ``CE(audio_logits[:-1, k], label_audio_ids[k, 1:])``

all with ``ignore_index=-100``. Shifting over the concatenated segments is safe because column 0 of every
segment's labels is -100 (stream BOS, plus the delay-pattern fills). ``audio_loss`` is the mean of the
per-codebook losses, each a mean over its own valid targets, so a uniform guess reads
``uniform_reference(V) = ln(V)`` (ln(1026) ~ 6.93 for the release).

Empty targets are never turned into a silent 0.0 or a NaN:

* no valid audio target (every ``label_audio_ids`` is -100, or there is no audio-out at all):
  ``audio_loss is None``, ``n_audio_targets == 0`` and ``loss`` is the text loss alone;
* a codebook without any valid target is left out of the codebook mean and its ``codebook_losses`` entry is NaN
  (the per-codebook counts say which);
* no valid text target: ``text_loss is None`` and ``loss`` is the audio loss alone;
* neither: ``loss`` is a zero that is still attached to the graph (``backward()`` works and yields zero
  gradients) and ``LossResult.empty`` is True: callers must check it rather than log the 0.0.

``unshifted=True`` reproduces the community bug (boson-ai/higgs-audio#94): the audio CE is taken between
``audio_logits[:, k]`` and ``label_audio_ids[k, :]`` at the *same* position. Since the label at a position
equals the audio-out input at that position, the model only has to copy its input and this loss collapses
towards 0 while nothing useful is learned. It exists to compare against and to build fixtures; the text
loss stays shifted either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "LossResult", "dual_loss", "higgs_audio_loss", "uniform_reference"]


@dataclass(frozen=True)
class LossResult:
    """Result of :func:`dual_loss`. Tensors are 0-d (``codebook_losses`` is ``[C]``) and keep their graph."""

    loss: torch.Tensor
    text_loss: Optional[torch.Tensor]
    audio_loss: Optional[torch.Tensor]
    codebook_losses: torch.Tensor
    n_text_targets: int
    n_audio_targets: int
    n_audio_targets_per_codebook: Tuple[int, ...]
    unshifted: bool = False

    @property
    def empty(self) -> bool:
        """True when the batch had no valid target at all (``loss`` is then a graph-attached zero)."""
        return self.text_loss is None and self.audio_loss is None

    def as_floats(self) -> dict:
        """Plain-float view for logging: ``None`` stays ``None``, codebook k is ``audio_loss_cb{k}``."""
        out = {
            "loss": float(self.loss.detach()),
            "text_loss": None if self.text_loss is None else float(self.text_loss.detach()),
            "audio_loss": None if self.audio_loss is None else float(self.audio_loss.detach()),
            "n_text_targets": self.n_text_targets,
            "n_audio_targets": self.n_audio_targets,
        }
        for k, value in enumerate(self.codebook_losses.detach().tolist()):
            out[f"audio_loss_cb{k}"] = None if math.isnan(value) else value
        return out


def uniform_reference(codebook_size_plus_2: int) -> float:
    """Cross-entropy of a uniform guess over ``codebook_size + 2`` audio classes: ``ln(V)``."""
    if codebook_size_plus_2 < 1:
        raise ValueError(f"need at least one class, got {codebook_size_plus_2}")
    return math.log(codebook_size_plus_2)


def scored_text_positions(logits: torch.Tensor, labels: torch.Tensor, *, unshifted: bool = False,
                          ignore_index: int = IGNORE_INDEX):
    """The text positions a loss scores, the one definition of which logit predicts which label: position t
    predicts label t+1 (``unshifted=True``: label t, the bug). Returns (rows [n, V] of the scored logits,
    targets [n], mask over ``labels[:, shift:]``). Only the scored rows are gathered."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"text logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}: pass the model's "
            "expanded_labels, not the collator's label_ids"
        )
    shift = 0 if unshifted else 1
    lab = labels[:, shift:]
    mask = lab != ignore_index
    return logits[:, : logits.shape[1] - shift][mask], lab[mask], mask


def _text_loss(logits, labels, ignore_index):
    if logits is None or labels is None or logits.shape[1] < 2:
        return None, 0
    rows, targets, _ = scored_text_positions(logits, labels, ignore_index=ignore_index)
    n = int(targets.numel())
    if n == 0:
        return None, 0
    return F.cross_entropy(rows.float(), targets, reduction="sum") / n, n


def _audio_losses(audio_logits, label_audio_ids, unshifted, ignore_index):
    """Returns (codebook_losses [C] with NaN where no target, counts per codebook [C] long)."""
    n_pos, n_cb, _ = audio_logits.shape
    if label_audio_ids.dim() != 2 or label_audio_ids.shape[0] != n_cb or label_audio_ids.shape[1] != n_pos:
        raise ValueError(
            f"audio_logits {tuple(audio_logits.shape)} ([N, C, V]) do not match label_audio_ids "
            f"{tuple(label_audio_ids.shape)} ([C, N]); audio_logits with N=0 mean audio_out_ids never reached "
            "the model"
        )
    if unshifted:
        logits, labels = audio_logits, label_audio_ids
    else:
        logits, labels = audio_logits[:-1], label_audio_ids[:, 1:]
    labels = labels.t()  # [N', C]
    counts = (labels != ignore_index).sum(0)  # [C]
    if labels.numel() == 0:
        return torch.full((n_cb,), float("nan"), device=audio_logits.device), counts
    # CE over the last (class) dim: [N' * C, V] rows against [N' * C] targets -> per-position losses [N', C],
    # 0 where ignored (the same values as CE over the permuted [N', V, C] input, several times faster)
    n_rows, v = logits.shape[0], logits.shape[-1]
    per_pos = F.cross_entropy(
        logits.float().reshape(-1, v), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(n_rows, n_cb)
    sums = per_pos.sum(0)
    safe = counts.clamp(min=1).to(sums.dtype)
    per_cb = torch.where(counts > 0, sums / safe, torch.full_like(sums, float("nan")))
    return per_cb, counts


def dual_loss(
    logits: Optional[torch.Tensor],
    expanded_labels: Optional[torch.Tensor],
    audio_logits: Optional[torch.Tensor],
    label_audio_ids: Optional[torch.Tensor],
    *,
    unshifted: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> LossResult:
    """Shifted text CE + mean of the per-codebook shifted audio CE (see the module docstring).

    ``logits`` ``[B, T, vocab]`` and ``expanded_labels`` ``[B, T]`` come from the model output (not the
    collator's ``label_ids``); ``audio_logits`` is ``[N, C, V]``; ``label_audio_ids`` is ``[C, N]``.
    ``unshifted=True`` computes the buggy same-position audio CE instead (text stays shifted).
    Raises ValueError when shapes disagree (e.g. ``audio_logits`` is ``[0, C, V]`` while there are audio
    labels: ``audio_out_ids`` were dropped before the forward).
    """
    text_loss, n_text = _text_loss(logits, expanded_labels, ignore_index)

    audio_loss = None
    n_audio = 0
    n_per_cb: Tuple[int, ...] = ()
    cb_losses = torch.zeros(0)
    has_labels = label_audio_ids is not None and label_audio_ids.numel() > 0
    if audio_logits is not None and (has_labels or audio_logits.shape[0] > 0):
        if label_audio_ids is None:
            label_audio_ids = torch.full(
                (audio_logits.shape[1], 0), ignore_index, dtype=torch.long, device=audio_logits.device
            )
        cb_losses, counts = _audio_losses(audio_logits, label_audio_ids, unshifted, ignore_index)
        n_per_cb = tuple(int(c) for c in counts.tolist())
        n_audio = sum(n_per_cb)
        if n_audio > 0:
            audio_loss = cb_losses[counts > 0].mean()
    elif audio_logits is not None:
        cb_losses = torch.full((audio_logits.shape[1],), float("nan"), device=audio_logits.device)
        n_per_cb = (0,) * audio_logits.shape[1]

    parts = [x for x in (text_loss, audio_loss) if x is not None]
    if parts:
        loss = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    else:
        anchors = [t.float().sum() * 0.0 for t in (logits, audio_logits) if t is not None]
        loss = sum(anchors[1:], anchors[0]) if anchors else torch.zeros(())
    return LossResult(
        loss=loss,
        text_loss=text_loss,
        audio_loss=audio_loss,
        codebook_losses=cb_losses,
        n_text_targets=n_text,
        n_audio_targets=n_audio,
        n_audio_targets_per_codebook=n_per_cb,
        unshifted=unshifted,
    )


def higgs_audio_loss(outputs: Any, label_audio_ids: Optional[torch.Tensor], *, unshifted: bool = False) -> LossResult:
    """:func:`dual_loss` on a ``HiggsAudioModelOutputWithPast`` (or a mapping with the same keys)."""
    get = outputs.get if isinstance(outputs, dict) else (lambda k: getattr(outputs, k, None))
    return dual_loss(
        get("logits"), get("expanded_labels"), get("audio_logits"), label_audio_ids, unshifted=unshifted
    )
