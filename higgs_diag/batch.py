"""Higgs Audio batches: the schema, safe loading and saving, and the batch validation that the trainer runs
before every forward and `replay-batch` runs offline (one implementation for both).

Needs torch only. Nothing is unpickled: ``.pt`` files load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import limits

IGNORE_INDEX = -100
# HiggsAudioBatchInput's fields (boson_multimodal.data_collator.higgs_audio_collator), in its order.
FIELDS = (
    "input_ids", "attention_mask", "audio_features", "audio_feature_attention_mask", "audio_out_ids",
    "audio_out_ids_start", "audio_out_ids_start_group_loc", "audio_in_ids", "audio_in_ids_start", "label_ids",
    "label_audio_ids", "reward",
)
REQUIRED = ("input_ids", "label_ids", "audio_out_ids", "label_audio_ids", "audio_out_ids_start")
# Fields that hold ids, positions or masks: integer tensors of this many dimensions.
INTEGER_FIELDS = {"input_ids": 2, "label_ids": 2, "audio_out_ids": 2, "label_audio_ids": 2, "audio_in_ids": 2,
                  "audio_out_ids_start": 1, "audio_out_ids_start_group_loc": 1, "audio_in_ids_start": 1}
META_KEY = "_higgs_diag"  # the trainer's dumps keep step and losses here (plain Python values)
DUMP_FORMAT = "higgs-diag.batch/1"


class BatchError(Exception):
    """A batch file that cannot be used (the message names the file and what is wrong)."""


class BatchValidationError(ValueError):
    """Raised by ``validate_batch(mode="strict")``: the message names the field."""

    def __init__(self, issues: list["BatchIssue"], context: str = ""):
        self.issues = issues
        self.context = context
        text = "; ".join(str(i) for i in issues)
        super().__init__(f"{context}: {text}" if context else text)


@dataclass(frozen=True)
class BatchSpec:
    """What a batch is checked against, from the model config (all optional)."""

    num_codebooks: int | None = None
    codebook_size: int | None = None  # codes per codebook, without the stream BOS/EOS
    stream_bos_id: int | None = None
    stream_eos_id: int | None = None
    use_delay_pattern: bool | None = None
    audio_out_token_idx: int | None = None
    audio_in_token_idx: int | None = None
    vocab_size: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> "BatchSpec":
        """From a HiggsAudioConfig, its ``to_dict()`` or the logged ``model_config`` JSON."""
        if config is None:
            return cls()
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        text = get("text_config", None)
        tget = text.get if isinstance(text, Mapping) else (lambda k, d=None: getattr(text, k, d))
        return cls(
            num_codebooks=get("audio_num_codebooks", None),
            codebook_size=get("audio_codebook_size", None),
            stream_bos_id=get("audio_stream_bos_id", None),
            stream_eos_id=get("audio_stream_eos_id", None),
            use_delay_pattern=get("use_delay_pattern", None),
            audio_out_token_idx=get("audio_out_token_idx", None),
            audio_in_token_idx=get("audio_in_token_idx", None),
            vocab_size=tget("vocab_size", None) if text is not None else None,
        )


@dataclass(frozen=True)
class BatchIssue:
    """One problem with a batch. ``kind`` is stable (the trainer logs each kind once, replay maps kinds to
    findings); ``severity`` is ``critical`` or ``warning``."""

    kind: str
    field: str
    message: str
    severity: str = "critical"

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


# ---------------------------------------------------------------------------------------------------------
# conversion, loading, saving
# ---------------------------------------------------------------------------------------------------------
def as_dict(batch: Any) -> dict[str, Any]:
    """A batch as a plain dict of its non-None fields: from a dict, a ``HiggsAudioBatchInput`` (or any
    dataclass), or an object with attributes named like boson's fields."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if v is not None}
    if dataclasses.is_dataclass(batch):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
                if getattr(batch, f.name) is not None}
    out = {k: getattr(batch, k) for k in FIELDS if getattr(batch, k, None) is not None}
    if not out:
        raise TypeError(f"not a Higgs Audio batch: {type(batch).__name__} has none of the fields {', '.join(REQUIRED)}")
    return out


def save_batch(path: str | Path, batch: Any, meta: Mapping[str, Any] | None = None) -> Path:
    """Save a batch for ``higgs-diag replay-batch``: a plain dict of CPU tensors with boson field names
    (``torch.save``), plus ``_higgs_diag`` = {format, step, losses, ...} of plain Python values."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    for k, v in as_dict(batch).items():
        if isinstance(v, torch.Tensor):
            data[k] = v.detach().to("cpu").clone()
        elif isinstance(v, (int, float, bool)):
            data[k] = v
    m = {"format": DUMP_FORMAT}
    m.update({k: _plain(v) for k, v in (meta or {}).items()})
    data[META_KEY] = m
    tmp = p.with_name(p.name + ".tmp")
    torch.save(data, tmp)
    tmp.replace(p)
    return p


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def load_batch(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a batch file safely: ``.pt``/``.pth``/``.bin`` with ``torch.load(weights_only=True)``, or
    ``.safetensors``. Returns (tensors by field name, meta). Raises BatchError with a one-line reason.

    Within ``higgs_diag.limits``: only a regular file of at most ``MAX_BATCH_FILE_BYTES``; before torch sees a
    torch.save file its pickle is scanned (code is refused, the storages it declares and the archive's entries
    must fit in ``MAX_BATCH_TENSOR_BYTES``), and after loading every tensor must have at most
    ``MAX_TENSOR_ELEMENTS`` elements."""
    p = Path(path)
    try:
        limits.open_regular(p, limits.MAX_BATCH_FILE_BYTES, "batch file")[0].close()
    except limits.NotReadable as e:
        raise BatchError(f"{p}: {e}" if os.path.lexists(p) else f"{p}: no such file") from None
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover
            raise BatchError(f"{p}: reading .safetensors needs the safetensors package (pip install safetensors)")
        try:
            data: Any = load_file(str(p))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise BatchError(f"{p}: not a readable safetensors file ({_reason(e)})") from None
    else:
        data = _torch_load_safely(p)
    if not isinstance(data, Mapping):
        raise BatchError(f"{p}: expected a dict of tensors with boson field names, got {type(data).__name__}")
    meta = data.get(META_KEY) if isinstance(data.get(META_KEY), Mapping) else {}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if "batch" in data and isinstance(data["batch"], Mapping) and not tensors:  # {"batch": {...}} wrapping
        tensors = {k: v for k, v in data["batch"].items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise BatchError(f"{p}: holds no tensors (keys: {_shown(', '.join(map(str, list(data)[:10])))})")
    _check_tensor_sizes(p, tensors)
    known = [k for k in tensors if k in FIELDS]
    if not known:
        raise BatchError(f"{p}: none of its tensors is named like a Higgs Audio batch field "
                         f"({_shown(', '.join(map(str, list(tensors)[:8])))}); expected e.g. {', '.join(REQUIRED)}")
    return tensors, dict(meta)


def _check_tensor_sizes(p: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every tensor within ``limits.MAX_TENSOR_ELEMENTS`` (a view can show a 1-element storage as a huge shape)
    and all of them within ``limits.MAX_BATCH_TENSOR_BYTES``."""
    for k, v in tensors.items():
        if v.numel() > limits.MAX_TENSOR_ELEMENTS:
            raise BatchError(f"{p}: tensor {_shown(k, 80)} has {v.numel():,} elements, over the limit "
                             f"(higgs_diag.limits.MAX_TENSOR_ELEMENTS: {limits.MAX_TENSOR_ELEMENTS:,}); not used")
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    if total > limits.MAX_BATCH_TENSOR_BYTES:
        raise BatchError(f"{p}: its tensors hold {total:,} bytes, over the {limits.MAX_BATCH_TENSOR_BYTES:,}-byte "
                         f"limit (higgs_diag.limits.MAX_BATCH_TENSOR_BYTES); not used")


def _torch_load_safely(p: Path) -> Any:
    """``torch.load(weights_only=True)`` for what looks like a torch.save file; anything else is refused by
    its first bytes, before any unpickler sees it, with a message that says what the file is. A pickle that
    holds code, or declares more tensor data than the limits allow, is refused before torch reads it."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise BatchError(f"{p}: cannot be read ({e.strerror or e})") from None
    is_zip = head == b"PK\x03\x04"  # torch.save's format since torch 1.6
    if not is_zip and not head.startswith(b"\x80"):  # not a zip archive, not even a pickle (protocol >= 2)
        raise BatchError(f"{p}: not a torch.save file (neither a zip archive nor a pickle; starts with {head!r}); "
                         f"save batches with torch.save(dict_of_tensors) or as .safetensors")
    _prescan(p, is_zip)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "Unsupported global" in text or "Unsupported operand" in text:
            raise BatchError(f"{p}: holds pickled Python objects, not only tensors; higgs-diag loads batches "
                             f"with weights_only=True and never unpickles code (save a dict of tensors)") from None
        if is_zip:
            raise BatchError(f"{p}: truncated or damaged torch.save archive ({_reason(e)})") from None
        raise BatchError(f"{p}: a pickle that is not a torch.save file of tensors; not loaded ({_reason(e)})") from None


def _prescan(p: Path, is_zip: bool) -> None:
    """Refuse, before torch reads it, a torch.save file whose pickle calls code (``holds pickled code
    (os.system)``) or declares storages (or, for a zip, holds entries) beyond ``limits.MAX_BATCH_TENSOR_BYTES``."""
    cap, data = limits.MAX_BATCH_TENSOR_BYTES, b""
    try:
        if not is_zip:
            with open(p, "rb") as fh:
                data = fh.read(limits.MAX_BATCH_PICKLE_BYTES)
        else:
            with zipfile.ZipFile(p) as z:
                total = sum(i.file_size for i in z.infolist())  # what torch would inflate
                pkl = [i for i in z.infolist() if i.filename.endswith("data.pkl")]
                if total > cap + limits.MAX_BATCH_PICKLE_BYTES:
                    raise BatchError(f"{p}: the archive inflates to {total:,} bytes, over the {cap:,}-byte limit "
                                     f"for a batch (higgs_diag.limits.MAX_BATCH_TENSOR_BYTES); not loaded")
                if pkl and pkl[0].file_size > limits.MAX_BATCH_PICKLE_BYTES:
                    raise BatchError(f"{p}: its pickle has {pkl[0].file_size:,} bytes, over the limit "
                                     f"(higgs_diag.limits.MAX_BATCH_PICKLE_BYTES); not loaded")
                data = z.read(pkl[0]) if pkl else b""
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise BatchError(f"{p}: truncated or damaged torch.save archive ({_reason(e)})") from None
    code, declared = limits.scan_pickles(data, several=not is_zip)
    if code:
        module, _, attr = code.partition(".")
        module = {"posix": "os", "nt": "os", "__builtin__": "builtins"}.get(module, module)
        raise BatchError(f"{p}: holds pickled code ({_shown(module + '.' + attr)}), not loaded: a batch holds tensors, not "
                         f"pickled Python objects, and higgs-diag never unpickles code (save a dict of tensors "
                         f"with torch.save, or a .safetensors file)")
    if declared > cap:
        raise BatchError(f"{p}: declares {declared:,} bytes of tensor data, over the {cap:,}-byte limit "
                         f"(higgs_diag.limits.MAX_BATCH_TENSOR_BYTES); not loaded")


def _shown(text: Any, limit: int = 120) -> str:
    """Text from the file (a name, a key) on one line: escapes for anything unprintable, at most ``limit``."""
    s = str(text)
    s = s if s.isprintable() else s.encode("unicode_escape", "backslashreplace").decode("ascii")
    return s if len(s) <= limit else s[:limit] + "..."


def _reason(e: Exception) -> str:
    return _shown(str(e).strip().splitlines()[0], 200) if str(e).strip() else type(e).__name__


# ---------------------------------------------------------------------------------------------------------
# statistics and validation
# ---------------------------------------------------------------------------------------------------------
@dataclass
class BatchStats:
    n_segments: int = 0
    n_audio_out_tokens: int | None = None
    audio_positions: int = 0
    audio_targets: int = 0
    audio_targets_per_codebook: list[int] = field(default_factory=list)
    audio_masked_share: float = float("nan")
    audio_masked_share_per_codebook: list[float] = field(default_factory=list)
    segments_without_targets: int = 0
    audio_masked_share_per_segment: list[float] = field(default_factory=list)
    # stream BOS/EOS placement: segments whose first input column is not all stream BOS, whose last input
    # column is not all stream EOS, and whose first label column is not all -100 (the BOS is trained and a
    # shift over the concatenated segments leaks from one segment into the next)
    segments_bad_bos: int = 0
    segments_bad_eos: int = 0
    segments_first_label_unmasked: int = 0
    text_positions: int = 0
    text_targets: int = 0
    text_masked_share: float = float("nan")
    staircase: bool | None = None  # the delay-pattern BOS staircase seen in the inputs


def _bounds(starts: list, total: int) -> list[tuple[int, int]]:
    s = [min(max(int(x), 0), total) for x in starts]
    return [(a, max(a, s[i + 1] if i + 1 < len(s) else total)) for i, a in enumerate(s)]


def segment_bounds(starts: torch.Tensor, total: int) -> list[tuple[int, int]]:
    """[start, end) of each audio segment, clipped to the tensor (bad starts give empty segments)."""
    return _bounds(starts.reshape(-1).tolist(), total)


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a tensor (a copy only for a tensor on an accelerator). The checks below run in numpy:
    on the small tensors of one batch a numpy reduction costs about a quarter of a torch one, and the trainer
    runs them before every forward."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _all_equal_at(x: np.ndarray, cols: list[int], value: int) -> list[bool]:
    """For each column index: is ``x[:, col]`` equal to ``value`` in every row."""
    if not cols:
        return []
    return (x[:, cols] == value).all(0).tolist()


def _arrays(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: _np(v) for k, v in batch.items() if isinstance(v, torch.Tensor) and k in _ARRAY_FIELDS}


_ARRAY_FIELDS = ("input_ids", "attention_mask", "label_ids", "audio_out_ids", "label_audio_ids", "audio_in_ids")


def batch_stats(batch: Mapping[str, Any], spec: BatchSpec | None = None, *,
                arrays: Mapping[str, np.ndarray] | None = None) -> BatchStats:
    """Counts and shares of one batch, vectorised over segments (a fixed handful of array operations).
    ``arrays``: numpy views of the batch's tensors when the caller already has them."""
    spec = spec or BatchSpec()
    st = BatchStats()
    arr = arrays if arrays is not None else _arrays(batch)
    lab = batch.get("label_ids")
    if isinstance(lab, torch.Tensor) and lab.numel():
        am = batch.get("attention_mask")
        pos = int(arr["attention_mask"].sum()) if isinstance(am, torch.Tensor) and am.shape == lab.shape \
            else lab.numel()
        st.text_positions = pos
        st.text_targets = int(np.count_nonzero(arr["label_ids"] != IGNORE_INDEX))
        st.text_masked_share = 1 - st.text_targets / max(pos, 1)
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and spec.audio_out_token_idx is not None:
        st.n_audio_out_tokens = int(np.count_nonzero(arr["input_ids"] == spec.audio_out_token_idx))
    out, alab = batch.get("audio_out_ids"), batch.get("label_audio_ids")
    starts = batch.get("audio_out_ids_start")
    s_list = starts.reshape(-1).tolist() if isinstance(starts, torch.Tensor) else []
    st.n_segments = len(s_list)
    if isinstance(alab, torch.Tensor) and alab.dim() == 2 and alab.numel():
        valid = arr["label_audio_ids"] != IGNORE_INDEX
        n_cb, width = valid.shape
        per_cb = np.count_nonzero(valid, axis=1).tolist()
        st.audio_positions = int(valid.size)
        st.audio_targets = int(sum(per_cb))
        st.audio_targets_per_codebook = per_cb
        st.audio_masked_share = 1 - st.audio_targets / valid.size
        st.audio_masked_share_per_codebook = [1 - n / width for n in per_cb]
        if s_list:
            bounds = _bounds(s_list, width)
            col = np.count_nonzero(valid, axis=0)  # valid targets per column
            cum = np.concatenate(([0], np.cumsum(col)))
            per_seg = [int(cum[b] - cum[a]) for a, b in bounds]
            st.segments_without_targets = sum(1 for n in per_seg if n == 0)
            st.audio_masked_share_per_segment = [1 - n / max((b - a) * n_cb, 1) for n, (a, b) in zip(per_seg, bounds)]
            st.segments_first_label_unmasked = sum(1 for a, b in bounds if b > a and col[a] > 0)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.numel() and s_list:
        o = arr["audio_out_ids"]
        bounds = [(a, b) for a, b in _bounds(s_list, o.shape[1]) if b > a]
        if spec.stream_bos_id is not None:
            st.segments_bad_bos = _all_equal_at(o, [a for a, _ in bounds], spec.stream_bos_id).count(False)
        if spec.stream_eos_id is not None:
            st.segments_bad_eos = _all_equal_at(o, [b - 1 for _, b in bounds], spec.stream_eos_id).count(False)
        if o.shape[0] >= 2 and spec.stream_bos_id is not None:
            # delay pattern: codebooks k >= 1 still hold BOS in the segment's second column
            seen = _all_equal_at(o[1:], [a + 1 for a, b in bounds if b - a >= 2 and a + 1 < o.shape[1]],
                                 spec.stream_bos_id)
            st.staircase = all(seen) if seen else None
    return st


MIN_LEAK_FRAMES = 4  # shorter target segments are too short to call a copy of the reference audio


def _segment_rows(ids: np.ndarray, token: int | None, n_segments: int) -> list[int] | None:
    """The batch row of each audio segment, in order: the k-th segment belongs to the row of the k-th
    ``token`` (<|AUDIO|> or <|AUDIO_OUT|>) in ``input_ids`` read row by row. None when they do not add up."""
    if token is None:
        return None
    rows = np.nonzero(ids == token)[0].tolist()
    return rows if len(rows) == n_segments else None


def _codes0(x: np.ndarray, a: int, b: int, codebook_size: int) -> np.ndarray:
    """Codebook 0 of one segment without the stream BOS/EOS and delay fills (codebook 0 is never delayed)."""
    c = x[0, a:b]
    return np.ascontiguousarray(c[(c >= 0) & (c < codebook_size)], dtype=np.int64)


def target_leaks(batch: Mapping[str, Any], spec: BatchSpec) -> list[tuple[int, int, int, int]]:
    """Audio-out segments whose target codes appear inside an audio-in (reference) segment of the same sample:
    ``(row, out segment, in segment, frames)`` for each. Compares codebook 0 without BOS/EOS (the delay pattern
    leaves it in place); a target of fewer than ``MIN_LEAK_FRAMES`` frames is not judged."""
    arr = _arrays(batch)
    need = ("input_ids", "audio_out_ids", "audio_in_ids")
    if spec.codebook_size is None or any(k not in arr or arr[k].ndim != 2 or not arr[k].size for k in need):
        return []
    out_s, in_s = batch.get("audio_out_ids_start"), batch.get("audio_in_ids_start")
    if not isinstance(out_s, torch.Tensor) or not isinstance(in_s, torch.Tensor):
        return []
    o, i = arr["audio_out_ids"], arr["audio_in_ids"]
    ob, ib = _bounds(out_s.reshape(-1).tolist(), o.shape[1]), _bounds(in_s.reshape(-1).tolist(), i.shape[1])
    orow = _segment_rows(arr["input_ids"], spec.audio_out_token_idx, len(ob))
    irow = _segment_rows(arr["input_ids"], spec.audio_in_token_idx, len(ib))
    if orow is None or irow is None:
        return []
    refs: dict[int, list[tuple[int, bytes]]] = {}
    for k, (a, b) in enumerate(ib):
        refs.setdefault(irow[k], []).append((k, _codes0(i, a, b, spec.codebook_size).tobytes()))
    hits = []
    for k, (a, b) in enumerate(ob):
        tgt = _codes0(o, a, b, spec.codebook_size)
        if len(tgt) < MIN_LEAK_FRAMES:
            continue
        needle = tgt.tobytes()
        for j, hay in refs.get(orow[k], []):
            at = hay.find(needle)
            while at != -1 and at % 8:  # a match must start on a code boundary
                at = hay.find(needle, at + 1)
            if at != -1:
                hits.append((orow[k], k, j, len(tgt)))
                break
    return hits


def _outside(x: np.ndarray, lo: int, hi: int) -> bool:
    """Any value outside [lo, hi)? (details are computed only when this is True)"""
    return bool(x.min() < lo or x.max() >= hi)


def _labels_outside(x: np.ndarray, hi: int | None, n_masked: int) -> bool:
    """Any label that is neither -100 nor in [0, hi)? ``n_masked``: how many entries are -100."""
    mn, mx = int(x.min()), int(x.max())
    if (hi is not None and mx >= hi) or mn < IGNORE_INDEX:
        return True
    return mn < 0 and int(np.count_nonzero(x < 0)) != n_masked


def validate_batch(batch: Any, spec: BatchSpec | None = None, *, max_masked_share: float = 0.95,
                   mode: str = "report") -> list[BatchIssue]:
    """Check one batch before it reaches the model. ``mode``: ``report`` returns the issues, ``strict``
    raises BatchValidationError when a critical one is found (``warn`` is the trainer's business: it logs
    each kind once). Cheap: a few reductions over numpy views of the tensors, no copies of the batch
    (docs/performance.md: 0.09 ms, 1.5 % of a training step of the 33 k-parameter test model)."""
    spec = spec or BatchSpec()
    b = as_dict(batch)
    issues: list[BatchIssue] = []
    add = lambda kind, fld, msg, sev="critical": issues.append(BatchIssue(kind, fld, msg, sev))  # noqa: E731

    for name in REQUIRED:
        if not isinstance(b.get(name), torch.Tensor):
            add("missing-field", name, "missing from the batch: the model gets no audio targets without it"
                if name != "input_ids" else "missing from the batch")
    for name, dims in INTEGER_FIELDS.items():
        v = b.get(name)
        if isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.is_complex() or v.dim() != dims):
            add("bad-tensor", name, f"must be a {dims}-D integer tensor, got {v.dim()}-D {str(v.dtype).replace('torch.', '')} "
                f"of shape {list(v.shape)}")
    if any(i.kind == "bad-tensor" for i in issues):  # nothing below can be trusted on such tensors
        if mode == "strict":
            raise BatchValidationError([i for i in issues if i.severity == "critical"])
        return issues
    out, alab, starts = b.get("audio_out_ids"), b.get("label_audio_ids"), b.get("audio_out_ids_start")
    ids, lab = b.get("input_ids"), b.get("label_ids")
    arr = _arrays(b)
    st = batch_stats(b, spec, arrays=arr)
    if isinstance(ids, torch.Tensor) and ids.numel() and spec.vocab_size is not None \
            and _outside(arr["input_ids"], 0, spec.vocab_size):
        bad = (ids < 0) | (ids >= spec.vocab_size)
        add("id-range", "input_ids", f"holds {int(bad.sum())} ids outside [0, {spec.vocab_size - 1}] "
            f"(e.g. {ids[bad][0].item()}): the text embedding would fail (vocab_size {spec.vocab_size})")
    if spec.codebook_size is not None:
        for name in ("audio_out_ids", "audio_in_ids"):
            v = b.get(name)
            if isinstance(v, torch.Tensor) and v.numel() and _outside(arr[name], 0, spec.codebook_size + 2):
                bad = (v < 0) | (v >= spec.codebook_size + 2)
                add("id-range", name, f"holds {int(bad.sum())} codes outside [0, {spec.codebook_size + 1}] "
                    f"(codebook_size {spec.codebook_size} + stream BOS/EOS; e.g. {v[bad][0].item()})")
    if isinstance(out, torch.Tensor):
        if out.dim() != 2 or out.shape[1] == 0:
            add("empty-audio-out", "audio_out_ids",
                f"empty (shape {list(out.shape)}): the model returns audio_logits of shape [0, C, V] and learns no audio")
        elif spec.num_codebooks is not None and out.shape[0] != spec.num_codebooks:
            add("codebook-count", "audio_out_ids",
                f"has {out.shape[0]} codebooks, the model config has audio_num_codebooks={spec.num_codebooks}")
    if isinstance(out, torch.Tensor) and isinstance(alab, torch.Tensor) and out.shape != alab.shape:
        add("shape-mismatch", "label_audio_ids",
            f"shape {list(alab.shape)} differs from audio_out_ids {list(out.shape)}: labels and inputs must align")
    if isinstance(ids, torch.Tensor) and isinstance(lab, torch.Tensor) and ids.shape != lab.shape:
        add("shape-mismatch", "label_ids", f"shape {list(lab.shape)} differs from input_ids {list(ids.shape)}")
    if isinstance(starts, torch.Tensor) and isinstance(out, torch.Tensor) and out.dim() == 2:
        s = starts.reshape(-1).tolist()
        if not s and out.shape[1] > 0:
            add("bad-starts", "audio_out_ids_start", "empty while audio_out_ids holds codes")
        elif s:
            if s[0] != 0 or any(y <= x for x, y in zip(s, s[1:])) or s[-1] >= max(out.shape[1], 1):
                add("bad-starts", "audio_out_ids_start",
                    f"{s[:8]} must start at 0, increase strictly and stay inside audio_out_ids "
                    f"(length {out.shape[1]})")
    if isinstance(alab, torch.Tensor) and alab.numel():
        hi = (spec.codebook_size + 2) if spec.codebook_size is not None else None
        n_masked = alab.numel() - st.audio_targets if alab.dim() == 2 else int((alab == IGNORE_INDEX).sum())
        if _labels_outside(arr["label_audio_ids"], hi, n_masked):
            bad = (alab < 0) & (alab != IGNORE_INDEX)
            if hi is not None:
                bad |= alab >= hi
            add("label-range", "label_audio_ids", f"holds {int(bad.sum())} values outside -100 and "
                f"[0, {hi - 1 if hi else 'codebook_size+1'}] (e.g. {alab[bad][0].item()})")
    if isinstance(lab, torch.Tensor) and lab.numel() and spec.vocab_size is not None \
            and _labels_outside(arr["label_ids"], spec.vocab_size, lab.numel() - st.text_targets):
        bad = ((lab < 0) & (lab != IGNORE_INDEX)) | (lab >= spec.vocab_size)
        add("label-range", "label_ids", f"holds {int(bad.sum())} values outside -100 and [0, {spec.vocab_size - 1}]")
    if isinstance(out, torch.Tensor) and isinstance(alab, torch.Tensor) and out.shape == alab.shape and out.numel():
        if st.audio_targets == st.audio_positions and np.array_equal(arr["audio_out_ids"], arr["label_audio_ids"]):
            add("labels-are-inputs", "label_audio_ids",
                "identical to audio_out_ids (no -100 anywhere): stream BOS, delay-pattern fills and reference "
                "audio are trained; use the collator's label_audio_ids")
    if st.audio_positions:
        if st.audio_targets == 0:
            add("all-audio-masked", "label_audio_ids", "every audio label is -100: no audio target reaches the loss")
        elif st.audio_masked_share > max_masked_share:
            add("over-masked", "label_audio_ids",
                f"{st.audio_masked_share:.1%} of the audio labels are -100 (threshold {max_masked_share:.0%})",
                "warning")
    if st.segments_bad_bos or st.segments_bad_eos:
        what = [f"{n} of {st.n_segments} segments {w}" for n, w in (
            (st.segments_bad_bos, f"do not start with the stream BOS ({spec.stream_bos_id}) in every codebook"),
            (st.segments_bad_eos, f"do not end with the stream EOS ({spec.stream_eos_id}) in every codebook")) if n]
        add("stream-bos-eos", "audio_out_ids", "; ".join(what) + ": segments are cut, padded or built without "
            "the collator's [BOS, codes, EOS] framing", "warning")
    if st.segments_first_label_unmasked and not any(i.kind == "labels-are-inputs" for i in issues):
        add("unmasked-bos", "label_audio_ids", f"the first label column of {st.segments_first_label_unmasked} of "
            f"{st.n_segments} segments is not -100: the stream BOS is trained, and the one-position shift over the "
            "concatenated segments scores the end of one segment against the start of the next", "warning")
    if st.n_audio_out_tokens is not None and st.n_segments and st.n_audio_out_tokens != st.n_segments:
        add("segment-count", "input_ids", f"holds {st.n_audio_out_tokens} <|AUDIO_OUT|> tokens for {st.n_segments} "
            f"audio-out segments (audio_out_ids_start): text and audio are misaligned")
    if spec.use_delay_pattern is not None and st.staircase is not None and st.staircase != spec.use_delay_pattern:
        add("delay-pattern", "audio_out_ids",
            "built without the delay pattern while model.config.use_delay_pattern=True" if spec.use_delay_pattern
            else "has the delay-pattern staircase while model.config.use_delay_pattern=False")
    if mode == "strict" and any(i.severity == "critical" for i in issues):
        raise BatchValidationError([i for i in issues if i.severity == "critical"])
    return issues


def finite_or_none(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
