"""Will the model fit? Checked before anything is loaded, from the safetensors headers alone.

Needed = the weights in the dtype they will be used in (every float tensor the model loads: parameters x
the dtype's size; other tensors at their stored size) + a margin for one forward pass:

* ``RUNTIME_BYTES`` (512 MiB): the transformers/boson_multimodal imports, the batch tensors, allocator slack;
* the activations of a reference batch of ``REFERENCE_SAMPLES`` x ``REFERENCE_POSITIONS`` positions (the
  expanded text + audio sequence: 2 x 1,024 holds two 30 s utterances at 25 frames/s with 200-token prompts), in the model
  dtype: the text logits (vocab per position), the MLP intermediates (4 x intermediate_size), hidden-size
  tensors of the layer being run (16 x hidden_size), and the attention scores (heads x positions^2 per sample,
  float32).

For the release geometry (5.77 B parameters, vocab 128,256, hidden 3,072, intermediate 8,192, 24 heads) the
margin is 1.6 GB in bfloat16 and 2.5 GB in float32: needed 13.1 GB in bfloat16, 25.5 GB in float32.

Available = ``MemAvailable`` of ``/proc/meminfo`` on CPU (what the kernel can hand out without swapping,
reclaimable page cache included: a memory-mapped checkpoint already in the page cache counts as available,
as it should), ``torch.cuda.mem_get_info`` (free bytes) on a GPU. Unknown (another OS, MPS): no check.
``HIGGS_DIAG_NO_MEMORY_CHECK=1`` skips the check.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .checkpoint import normalize_base_key, parse_lora_key
from .errors import ReplayError

GB = 1e9
RUNTIME_BYTES = 512 * 2**20
REFERENCE_SAMPLES, REFERENCE_POSITIONS = 2, 1024
SKIP_ENV = "HIGGS_DIAG_NO_MEMORY_CHECK"
MEMINFO = "/proc/meminfo"

FLOAT_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
INT_SIZES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DTYPE_SIZES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
ST_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


@dataclass
class Weights:
    """What the model will load, from the safetensors headers: float parameters (by stored dtype) and the bytes
    of the other tensors."""

    float_params: dict[str, int]  # stored safetensors dtype (BF16, F32, ...) -> number of parameters
    other_bytes: int = 0

    @property
    def n_float(self) -> int:
        return sum(self.float_params.values())

    @property
    def stored_dtype(self) -> str | None:
        """The torch dtype name most float parameters are stored in (``bfloat16`` for the release), or None."""
        if not self.float_params:
            return None
        return ST_NAMES.get(max(self.float_params, key=self.float_params.get))

    def bytes_in(self, dtype: str) -> int:
        return self.n_float * DTYPE_SIZES.get(dtype, 4) + self.other_bytes


def count_weights(tensors: Iterable[tuple[str, list[int], str]]) -> Weights:
    """``(name, shape, safetensors dtype)`` of the files the model loads -> :class:`Weights`. LoRA A/B matrices
    (merged one module at a time) and PEFT's ``original_module`` copies (skipped) are not counted."""
    floats: dict[str, int] = {}
    other = 0
    for name, shape, dt in tensors:
        if parse_lora_key(name) is not None or normalize_base_key(name) is None:
            continue
        n = 1
        for s in shape:
            n *= int(s)
        if dt in FLOAT_SIZES:
            floats[dt] = floats.get(dt, 0) + n
        else:
            other += n * INT_SIZES.get(dt, 8)
    return Weights(floats, other)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) else config


def _int(d: dict[str, Any], key: str, default: int) -> int:
    v = d.get(key)
    return int(v) if isinstance(v, (int, float)) and v > 0 else default


def activation_bytes(config: dict[str, Any] | None, dtype: str) -> int:
    """The margin for one forward pass of the reference batch (see the module docstring)."""
    tc = _text_config(config or {})
    vocab = _int(tc, "vocab_size", 128256)
    hidden = _int(tc, "hidden_size", 3072)
    inter = _int(tc, "intermediate_size", 4 * hidden)
    heads = _int(tc, "num_attention_heads", 32)
    size = DTYPE_SIZES.get(dtype, 4)
    positions = REFERENCE_SAMPLES * REFERENCE_POSITIONS
    per_position = (vocab + 4 * inter + 16 * hidden) * size
    attention = REFERENCE_SAMPLES * heads * REFERENCE_POSITIONS ** 2 * 4
    return RUNTIME_BYTES + positions * per_position + attention


def needed_bytes(weights: Weights, config: dict[str, Any] | None, dtype: str) -> int:
    return weights.bytes_in(dtype) + activation_bytes(config, dtype)


def meminfo_available(path: str | os.PathLike = MEMINFO) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where there is no such file or line."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            try:
                return int(parts[1]) * (1024 if len(parts) < 3 or parts[2].lower() == "kb" else 1)
            except (IndexError, ValueError):
                return None
    return None


def available_bytes(device) -> tuple[int | None, str]:
    """(bytes the replay can use on ``device``, where the number comes from); (None, ...) when unknown."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cpu":
        return meminfo_available(), "MemAvailable in /proc/meminfo"
    if kind == "cuda":
        import torch

        try:
            free, _total = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError, ValueError):
            return None, "torch.cuda.mem_get_info"
        return int(free), f"free on {device}"
    return None, f"unknown for {device}"


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


def check_fits(weights: Weights, config: dict[str, Any] | None, device, dtype: str, *, what: str,
               asked: str | None = None, alternatives: Iterable[tuple[str, Weights, dict | None, str]] = ()) -> None:
    """Raise a one-line :class:`ReplayError` when the weights in ``dtype`` plus the forward margin do not fit in
    the memory available on ``device``; say how much is needed, how much there is, and which option fits.

    ``what``: the checkpoint, for the message; ``asked``: the ``--dtype`` given (None/auto: the checkpoint's
    own); ``alternatives``: ``(option text, weights, config, dtype)`` of other ways to replay the same run (a
    LoRA adapter on its base instead of merged weights), suggested when they fit."""
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return
    have, source = available_bytes(device)
    if have is None:
        return
    need = needed_bytes(weights, config, dtype)
    if need <= have:
        return
    kind = getattr(device, "type", str(device).split(":")[0])
    fits: list[str] = []
    for alt in ("bfloat16",):  # a smaller dtype on the same device
        if DTYPE_SIZES.get(alt, 4) < DTYPE_SIZES.get(dtype, 4):
            n = needed_bytes(weights, config, alt)
            if n <= have:
                fits.append(f"--dtype {alt} ({_gb(n)})")
    if kind == "cpu":
        gpu = _cuda_free()
        if gpu is not None:
            for dt in dict.fromkeys((dtype, "bfloat16")):
                n = needed_bytes(weights, config, dt)
                if n <= gpu:
                    fits.append(f"--device cuda{'' if dt == dtype else ' --dtype ' + dt} ({_gb(n)} of "
                                f"{_gb(gpu)} free)")
                    break
    for option, alt_weights, alt_config, alt_dtype in alternatives:
        n = needed_bytes(alt_weights, alt_config, alt_dtype)
        if n <= have:
            fits.append(f"{option} ({_gb(n)} in {alt_dtype})")
    how = "asked for with --dtype" if asked not in (None, "", "auto") else "the checkpoint's own dtype"
    head = (f"{what}: replaying needs about {_gb(need)} of memory ({_params(weights.n_float)} parameters in "
            f"{dtype}, {how}: {_gb(weights.bytes_in(dtype))}, plus {_gb(need - weights.bytes_in(dtype))} for the "
            f"forward pass) but {_gb(have)} is available ({source}); stopped before loading")
    if fits:
        tail = "; fits: " + " or ".join(fits)
    else:
        smallest = min(needed_bytes(weights, config, d) for d in (dtype, "bfloat16"))
        tail = (f"; nothing fits here (the least is {_gb(smallest)}): free memory, replay on a GPU with "
                f"--device cuda, or check the batches alone with --no-model")
    raise ReplayError(head + tail + f" ({SKIP_ENV}=1 skips this check)")


def _cuda_free() -> int | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        have, _ = available_bytes(torch.device("cuda", torch.cuda.current_device()))
        return have
    except Exception:  # pragma: no cover - a broken CUDA setup: no suggestion
        return None
