"""What a replay measured: plain data (no torch), read by the replay checks and written into the report.

The replay (``higgs_diag.replay``) turns a checkpoint and batch files into these records (``higgs_diag.replay.api``); the checks in
``higgs_diag.checks.replay`` turn the records into findings. Counts and sums are kept rather than means, so
that batches streamed one at a time (or on several ranks) aggregate exactly.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _mean(total: float, n: int) -> float | None:
    return total / n if n else None


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass
class ModelSource:
    """The checkpoint as found on disk (torch-free inspection: JSON files and safetensors headers)."""

    path: str
    kind: str  # full | adapter | wrapper | wrapper-lora
    model_class: str  # HiggsAudioModel | PeftModel | PeftModelForCausalLM | ... | wrapper
    step: int | None = None
    weight_files: list[str] = field(default_factory=list)
    n_tensors: int = 0
    config: dict[str, Any] | None = None
    config_from: str | None = None
    base: str | None = None  # the base model folder of an adapter
    base_from: str | None = None  # --base | adapter_config.json base_model_name_or_path
    adapter_config: dict[str, Any] | None = None
    adapter_config_from: str | None = None
    prefix: str = ""  # key prefix of a wrapper state dict, e.g. "model." or "model.base_model.model."
    lora_modules: int = 0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_alpha_from: str | None = None
    checkpoint_dtype: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def describe(self) -> str:
        what = {"full": "full model", "adapter": "PEFT LoRA adapter", "wrapper": "wrapper-module state dict",
                "wrapper-lora": "wrapper-module state dict with LoRA"}.get(self.kind, self.kind)
        step = f", step {self.step}" if self.step is not None else ""
        return f"{what} ({self.model_class}{step})"


@dataclass
class ModelRecord:
    """What one forward pass of one batch showed. Sums over valid targets, so batches add up."""

    audio_logits_shape: list[int] = field(default_factory=list)
    logits_finite: bool = True
    audio_logits_finite: bool = True
    vocab_audio: int | None = None  # codebook_size + 2: the classes of each audio head
    # text: shifted CE(logits[:, t], label[t+1]) over valid targets, and the same-position variant
    n_text: int = 0
    text_ce_sum: float = 0.0
    n_text_unshifted: int = 0
    text_ce_unshifted_sum: float = 0.0
    text_copy: int = 0  # argmax at t == input token at t (over the shifted targets' positions)
    text_repeat: int = 0  # label at t+1 == input at t: how often copying would be right anyway
    text_correct: int = 0  # argmax at t == label at t+1
    # the text CE against the collator's *unexpanded* label_ids (what a trainer that pops label_ids and skips
    # the model's expanded_labels computes), truncated to the shorter of the two: shifted and same-position
    n_text_unexpanded: int = 0
    text_ce_unexpanded_sum: float = 0.0
    n_text_unexpanded_same: int = 0
    text_ce_unexpanded_same_sum: float = 0.0
    expanded_labels_missing: int = 0  # forwards whose expanded_labels were missing or not as long as the logits
    text_expansion: int = 0  # positions the audio spans add (expanded length - input length), summed
    # audio, per codebook
    n_audio_per_cb: list[int] = field(default_factory=list)
    audio_ce_sum_per_cb: list[float] = field(default_factory=list)
    n_audio_unshifted_per_cb: list[int] = field(default_factory=list)
    audio_ce_unshifted_sum_per_cb: list[float] = field(default_factory=list)
    audio_positions: int = 0  # (position, codebook) pairs scored by the shifted loss
    audio_copy: int = 0
    audio_repeat: int = 0
    audio_correct: int = 0
    audio_copy_per_cb: list[int] = field(default_factory=list)
    audio_positions_per_cb: list[int] = field(default_factory=list)
    forward_seconds: float = 0.0
    check_seconds: float = 0.0

    # ---- derived -----------------------------------------------------------------------------------
    @property
    def text_ce(self) -> float | None:
        return _mean(self.text_ce_sum, self.n_text)

    @property
    def text_ce_unshifted(self) -> float | None:
        return _mean(self.text_ce_unshifted_sum, self.n_text_unshifted)

    @property
    def text_ce_unexpanded(self) -> float | None:
        return _mean(self.text_ce_unexpanded_sum, self.n_text_unexpanded)

    @property
    def text_ce_unexpanded_same(self) -> float | None:
        return _mean(self.text_ce_unexpanded_same_sum, self.n_text_unexpanded_same)

    @property
    def audio_ce_per_cb(self) -> list[float | None]:
        return [_mean(s, n) for s, n in zip(self.audio_ce_sum_per_cb, self.n_audio_per_cb)]

    @property
    def audio_ce_unshifted_per_cb(self) -> list[float | None]:
        return [_mean(s, n) for s, n in zip(self.audio_ce_unshifted_sum_per_cb, self.n_audio_unshifted_per_cb)]

    @property
    def audio_ce(self) -> float | None:
        """Mean over the codebooks that have targets of the per-codebook means (the trainer's convention)."""
        vals = [v for v in self.audio_ce_per_cb if v is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def audio_ce_unshifted(self) -> float | None:
        vals = [v for v in self.audio_ce_unshifted_per_cb if v is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def n_audio(self) -> int:
        return sum(self.n_audio_per_cb)

    @property
    def audio_copy_rate(self) -> float | None:
        return _rate(self.audio_copy, self.audio_positions)

    @property
    def audio_repeat_rate(self) -> float | None:
        return _rate(self.audio_repeat, self.audio_positions)

    @property
    def audio_accuracy(self) -> float | None:
        return _rate(self.audio_correct, self.audio_positions)

    @property
    def text_copy_rate(self) -> float | None:
        return _rate(self.text_copy, self.n_text)

    @property
    def text_repeat_rate(self) -> float | None:
        return _rate(self.text_repeat, self.n_text)

    @property
    def uniform(self) -> float | None:
        return math.log(self.vocab_audio) if self.vocab_audio else None

    @property
    def audio_empty(self) -> bool:
        return bool(self.audio_logits_shape) and self.audio_logits_shape[0] == 0

    def total(self, unshifted_audio: bool = False) -> float | None:
        """text CE + audio CE: the `loss` a dual-loss trainer logs (audio unshifted if asked)."""
        parts = [self.text_ce, self.audio_ce_unshifted if unshifted_audio else self.audio_ce]
        parts = [p for p in parts if p is not None]
        return sum(parts) if parts else None

    @classmethod
    def combine(cls, records: list["ModelRecord"]) -> "ModelRecord | None":
        recs = [r for r in records if r is not None]
        if not recs:
            return None
        out = cls()
        out.audio_logits_shape = list(recs[0].audio_logits_shape)
        if out.audio_logits_shape:
            out.audio_logits_shape[0] = sum(r.audio_logits_shape[0] for r in recs if r.audio_logits_shape)
        out.vocab_audio = next((r.vocab_audio for r in recs if r.vocab_audio), None)
        out.logits_finite = all(r.logits_finite for r in recs)
        out.audio_logits_finite = all(r.audio_logits_finite for r in recs)
        for f in fields(cls):
            v0 = getattr(out, f.name)
            if f.name in ("audio_logits_shape", "vocab_audio", "logits_finite", "audio_logits_finite"):
                continue
            if isinstance(v0, list):
                width = max(len(getattr(r, f.name)) for r in recs)
                acc = [0] * width if f.name.startswith(("n_", "audio_copy", "audio_positions")) else [0.0] * width
                for r in recs:
                    for i, x in enumerate(getattr(r, f.name)):
                        acc[i] += x
                setattr(out, f.name, acc)
            else:
                setattr(out, f.name, sum(getattr(r, f.name) for r in recs))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(text_ce=self.text_ce, text_ce_unshifted=self.text_ce_unshifted, audio_ce=self.audio_ce,
                 text_ce_unexpanded=self.text_ce_unexpanded, text_ce_unexpanded_same=self.text_ce_unexpanded_same,
                 audio_ce_unshifted=self.audio_ce_unshifted, audio_ce_per_cb=self.audio_ce_per_cb,
                 audio_ce_unshifted_per_cb=self.audio_ce_unshifted_per_cb, audio_copy_rate=self.audio_copy_rate,
                 audio_repeat_rate=self.audio_repeat_rate, audio_accuracy=self.audio_accuracy,
                 text_copy_rate=self.text_copy_rate, text_repeat_rate=self.text_repeat_rate, uniform=self.uniform)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class LoggedLosses:
    """Losses the training logged for a batch (or near the checkpoint's step)."""

    source: str  # "batch dump" | "trainer_state.json" | "TensorBoard" | ...
    step: int | None
    values: dict[str, float]
    exact: bool  # True when the values were computed on this very batch
    file: str | None = None

    def get(self, name: str) -> float | None:
        v = self.values.get(name)
        return v if isinstance(v, (int, float)) else None


@dataclass
class BatchRecord:
    """One batch file as replayed through one checkpoint. ``step`` is the training step the batch was used at
    (its dump's meta, its name, or ``--batch-step``); ``checkpoint_step`` the step of the weights that measured
    it (the same batch appears once per checkpoint with ``--all-checkpoints``)."""

    path: str
    step: int | None = None
    step_from: str | None = None  # "meta" | "file name" | "--batch-step"
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    keys: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # higgs_diag.batch.BatchStats as a dict
    issues: list[dict[str, str]] = field(default_factory=list)  # BatchIssue as dicts
    model: ModelRecord | None = None
    logged: LoggedLosses | None = None

    def issue(self, kind: str) -> dict[str, str] | None:
        return next((i for i in self.issues if i["kind"] == kind), None)

    @property
    def name(self) -> str:
        return self.path.replace("\\", "/").rsplit("/", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict() if self.model else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BatchRecord":
        d = dict(d)
        d["model"] = ModelRecord.from_dict(d["model"]) if d.get("model") else None
        d["logged"] = LoggedLosses(**d["logged"]) if d.get("logged") else None
        return cls(**d)


@dataclass
class WeightsRecord:
    """A checkpoint's trainable tensors, fingerprinted (``higgs_diag.replay.weights``): two checkpoints with the
    same digest hold the same weights; LoRA B matrices that are all zero never received an update."""

    checkpoint: str
    step: int | None
    kind: str
    digest: str
    n_tensors: int
    sampled: bool  # True when only the first bytes of each tensor were read (a full model)
    lora_b_tensors: int = 0
    lora_b_zero: int = 0


@dataclass
class EvalPrediction:
    """The Trainer's eval_loss decision (FACTS §2) reproduced for this run: see ``replay.evalpred``."""

    produced: bool | None  # None: evaluation would raise before producing anything
    model_class: str
    label_names: list[str]
    label_names_from: str  # "args" | "default of <class>"
    batch_keys: list[str]
    has_labels: bool
    loss_without_labels: bool
    missing_keys: list[str] = field(default_factory=list)
    raises: str | None = None
    evaluation_configured: bool | None = None
    best_metric: str | None = None  # the metric that selects the best checkpoint (eval_loss, ...)
    assumptions: list[str] = field(default_factory=list)
    reason: str = ""
    fix: str = ""


@dataclass
class ReplayEvidence:
    source: ModelSource | None
    batches: list[BatchRecord]
    no_model: bool = False
    run_root: str | None = None
    run_args: dict[str, Any] | None = None
    run_model_config_from: str | None = None
    config: dict[str, Any] | None = None  # the model config the batches were checked against
    config_from: str | None = None
    eval: EvalPrediction | None = None
    device: str | None = None
    dtype: str | None = None
    world_size: int = 1
    seconds: dict[str, float] = field(default_factory=dict)
    # fingerprints of the checkpoints' trainable weights (all checkpoints of the run, oldest first)
    weights: list[WeightsRecord] = field(default_factory=list)
    # why nothing was replayed (no checkpoint, no batch dumps): the log report stands alone, with a note
    skipped: str | None = None
    # the Run the replay belongs to (``analyze --replay``), for rules that weigh replay against the logs;
    # not part of the report
    run: Any = field(default=None, repr=False, compare=False)

    @property
    def model(self) -> ModelRecord | None:
        return ModelRecord.combine([b.model for b in self.batches if b.model is not None])

    @property
    def checkpoints(self) -> list[tuple[int | None, str]]:
        """The checkpoints the batches were replayed through, ``(step, path)`` in step order."""
        seen = {(b.checkpoint_step, b.checkpoint) for b in self.batches if b.checkpoint is not None}
        return sorted(seen, key=lambda x: (x[0] is None, x[0] or 0, x[1]))

    @classmethod
    def merge(cls, parts: list["ReplayEvidence"]) -> "ReplayEvidence":
        """One evidence from replays through several checkpoints: their batches in (step, checkpoint step)
        order; the source, eval prediction and config of the latest checkpoint; the timings added up."""
        if len(parts) == 1:
            return parts[0]
        last = max(parts, key=lambda e: (e.source.step or -1) if e.source is not None else -1)
        out = dataclasses.replace(last, batches=[b for e in parts for b in e.batches], seconds={})
        out.batches.sort(key=lambda b: (b.step is None, b.step or 0, b.checkpoint_step or 0))
        for e in parts:
            for k, v in e.seconds.items():
                out.seconds[k] = out.seconds.get(k, 0.0) + v
        return out

    def summary(self) -> dict[str, Any]:
        m = self.model
        return {
            "skipped": self.skipped,
            "checkpoint": self.source.path if self.source else None,
            "checkpoints": [{"step": st, "path": p} for st, p in self.checkpoints],
            "checkpoint_kind": self.source.kind if self.source else None,
            "model_class": self.source.model_class if self.source else None,
            "checkpoint_step": self.source.step if self.source else None,
            "base": self.source.base if self.source else None,
            "config_from": self.config_from,
            "run": self.run_root,
            "no_model": self.no_model,
            "device": self.device,
            "dtype": self.dtype,
            "world_size": self.world_size,
            "n_batches": len(self.batches),
            "batches": [b.to_dict() for b in self.batches],
            "model": m.to_dict() if m else None,
            "eval_loss": asdict(self.eval) if self.eval else None,
            "weights": [asdict(w) for w in self.weights],
            "seconds": dict(self.seconds),
        }
