"""Build a HiggsAudioModel from its config and load a checkpoint into it: offline, strict, no unpickling.

The model is built with boson_multimodal's ``HiggsAudioModel(config)`` (never ``from_pretrained`` with a hub
id), its parameters on the ``meta`` device (no memory, no random initialisation; buffers such as the rotary
frequencies are built for real on the target device). After checking that the file's keys and shapes are
exactly the model's, the safetensors tensors are *assigned* to the parameters: memory-mapped views of the
files when their dtype is the one used on CPU (no copy: the weights stay file-backed pages, as with
``from_pretrained(low_cpu_mem_usage=True)``), converted or moved copies otherwise. The default dtype is the
checkpoint's own (the base's for an adapter). Before anything is loaded, the memory needed is compared with the
memory available (``higgs_diag.replay.memory``). LoRA weights (a PEFT adapter folder, or LoRA keys inside a
wrapper's state dict) are merged into the base weights: ``W += scale * B @ A`` with PEFT's scale
(``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA, per-module ``rank_pattern``/``alpha_pattern``);
the files are mapped private (copy-on-write), so a merge only turns the adapted matrices into private memory and
never writes to a file.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import memory
from .checkpoint import Inspection, headers, normalize_base_key, parse_lora_key
from .errors import ReplayError, missing_package
from ..layout import ADAPTER_CONFIG, LORA_ADAPTERS_DIR

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def import_boson():
    try:
        from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
    except ImportError as e:
        if getattr(e, "name", None) not in (None, "boson_multimodal") and not str(e.name).startswith("boson_multimodal"):
            raise ReplayError(f"boson_multimodal could not be imported: {str(e).splitlines()[0][:150]} (pip install "
                              f"'higgs-diag[model]'; `--no-model` runs the batch checks without it)") from None
        raise missing_package("boson_multimodal", "Replaying a batch through the model",
                              "pip install boson-multimodal==0.1.1 --no-deps; `--no-model` runs the batch checks "
                              f"without it; import error: {str(e).splitlines()[0][:120]}") from None
    return HiggsAudioConfig, HiggsAudioModel


def resolve_device(device: str | None) -> torch.device:
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ReplayError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, mps, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReplayError(f"--device {device}: CUDA is not available in this torch build; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """``auto``: the dtype the checkpoint's weights are stored in (``checkpoint_dtype``: a torch dtype name such
    as ``bfloat16``, or a safetensors one such as ``BF16``), on every device; float32 when unknown."""
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        stored = _ST_DTYPES.get(checkpoint_dtype or "", checkpoint_dtype or "")
        return DTYPES.get(str(stored).lower(), torch.float32)
    if name not in DTYPES:
        raise ReplayError(f"--dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    return DTYPES[name]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside is replaced by a ``meta`` tensor of its shape and dtype (buffers and
    plain tensors stay real): the model costs no memory until the checkpoint's tensors are assigned."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype, config_from: str | None):
    """The model with its parameters on ``meta`` (shapes and dtypes only) and its buffers on ``device``."""
    HiggsAudioConfig, HiggsAudioModel = import_boson()
    mt = str(config.get("model_type") or "")
    if mt and mt != "higgs_audio":
        raise ReplayError(f"{config_from}: model_type {mt!r}; replay runs boson_multimodal's HiggsAudioModel "
                          f"(model_type 'higgs_audio')" + (": transformers' higgs_audio_v2 port computes its own "
                                                          "shifted loss" if mt == "higgs_audio_v2" else ""))
    try:
        cfg = HiggsAudioConfig.from_dict(dict(config))
    except Exception as e:  # a config from another version or hand-edited
        raise ReplayError(f"{config_from}: not a HiggsAudioConfig ({type(e).__name__}: {str(e).splitlines()[0][:150]})") from None
    from transformers.modeling_utils import no_init_weights

    try:
        with _default_dtype(dtype), device, no_init_weights(), _parameters_on_meta():
            model = HiggsAudioModel(cfg)
    except Exception as e:
        raise ReplayError(f"{config_from}: HiggsAudioModel cannot be built from this config "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:150]})") from None
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class _Lora:
    module: str
    a: tuple[Path, str] | None = None
    b: tuple[Path, str] | None = None
    bias: tuple[Path, str] | None = None
    embedding: bool = False


def _pattern_value(patterns: dict[str, Any] | None, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _lora_scale(module: str, rank: int, insp: Inspection) -> float:
    src = insp.source
    cfg = src.adapter_config or {}
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, src.lora_alpha)
    if alpha is None:
        raise ReplayError(f"{src.path}: lora_alpha unknown; pass --lora-alpha N")
    r = _pattern_value(cfg.get("rank_pattern"), module, rank) or rank
    if cfg.get("use_rslora"):
        return float(alpha) / math.sqrt(r)
    return float(alpha) / r


def _plan(insp: Inspection, expected: dict[str, torch.Tensor], base: dict[str, tuple[Path, list[int], str]] | None = None):
    """-> (copies {target: (file, key)}, loras {module: _Lora}); raises ReplayError on any mismatch. ``base``: the
    headers of an adapter's base files, when already read."""
    src = insp.source
    copies: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, list[int]] = {}
    loras: dict[str, _Lora] = {}
    unexpected: list[str] = []

    def add_plain(tensors, prefix: str):
        for key, (file, shape, _dt) in tensors.items():
            lk = parse_lora_key(key)
            if lk is not None:
                mod = lk.module[len(prefix):] if lk.module.startswith(prefix) else None
                if mod is None:
                    unexpected.append(key)
                    continue
                if lk.part == "lora_magnitude_vector":
                    raise ReplayError(f"{file}: holds DoRA magnitude vectors ({key}); DoRA is not supported: merge "
                                      f"the adapter (merge_and_unload) and save a full model")
                entry = loras.setdefault(mod, _Lora(mod))
                if lk.part in ("lora_A", "lora_embedding_A") and lk.param != "bias":
                    entry.a = (file, key)
                elif lk.param == "bias":
                    entry.bias = (file, key)
                else:
                    entry.b = (file, key)
                entry.embedding = entry.embedding or lk.part.startswith("lora_embedding")
                continue
            if not key.startswith(prefix):
                unexpected.append(key)
                continue
            target = normalize_base_key(key[len(prefix):])
            if target is None:
                continue
            copies[target] = (file, key)
            shapes[target] = shape

    if src.kind == "adapter":
        add_plain(base if base is not None else base_headers(insp), "")
        add_plain(insp.tensors, src.prefix)
    else:
        add_plain(insp.tensors, src.prefix)

    missing = [k for k in expected if k not in copies]
    unexpected += [k for k in copies if k not in expected]
    bad_shape = [f"{k} {shapes[k]} vs {list(expected[k].shape)}" for k in copies
                 if k in expected and list(expected[k].shape) != shapes[k]]
    for mod, lo in loras.items():
        if lo.a is None or lo.b is None:
            raise ReplayError(f"{src.path}: LoRA weights of {mod} are incomplete (lora_A and lora_B both needed)")
        if f"{mod}.weight" not in expected:
            unexpected.append(f"{mod} (LoRA target not in the model)")
    cfg_from = src.config_from or "the model config"
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model keys missing from the checkpoint (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint keys the model does not have (e.g. {', '.join(unexpected[:3])})")
        if bad_shape:
            parts.append(f"{len(bad_shape)} shapes differ (e.g. {'; '.join(bad_shape[:2])})")
        hint = ("pass --base PATH to the base model this adapter was trained on" if src.kind == "adapter" else
                "pass --base PATH (a folder whose config.json matches these weights) or --run RUN_DIR")
        raise ReplayError(f"{src.weight_files[0]}: the keys do not match the config from {cfg_from}: "
                          + "; ".join(parts) + f"; {hint}")
    return copies, loras


def base_headers(insp: Inspection) -> dict[str, tuple[Path, list[int], str]]:
    """The headers of an adapter's base model files ({} for other checkpoints)."""
    if insp.source.kind != "adapter":
        return {}
    return headers([Path(f) for f in insp.source.weight_files[:-1]])


def loaded_weights(insp: Inspection, base: dict[str, tuple[Path, list[int], str]] | None = None) -> memory.Weights:
    """What loading the checkpoint puts in memory (the base's weights for an adapter), from the headers."""
    tensors = base if insp.source.kind == "adapter" else insp.tensors
    if tensors is None:
        tensors = base_headers(insp)
    prefix = insp.source.prefix if insp.source.kind != "adapter" else ""
    return memory.count_weights((k, shape, dt) for k, (_f, shape, dt) in tensors.items() if k.startswith(prefix))


def _config_dtype(config: dict[str, Any] | None) -> str | None:
    for c in (config or {}, (config or {}).get("text_config") or {}):
        v = c.get("torch_dtype") if isinstance(c, dict) else None
        if isinstance(v, str) and v.replace("torch.", "") in DTYPES:
            return v.replace("torch.", "")
    return None


def _adapter_alternative(insp: Inspection):
    """A LoRA adapter saved next to merged/wrapper weights (``checkpoint-N/lora_adapters/``): replaying it on
    its base may need less memory. Yields (option text, weights, config, dtype) when it can be inspected."""
    sub = insp.folder / LORA_ADAPTERS_DIR
    if insp.source.kind == "adapter" or not (sub / ADAPTER_CONFIG).is_file():
        return
    from .checkpoint import inspect_checkpoint

    try:
        alt = inspect_checkpoint(sub)
        w = loaded_weights(alt)
    except (ReplayError, OSError, ValueError):
        return
    dt = w.stored_dtype or _config_dtype(alt.source.config) or "float32"
    yield f"the LoRA adapter {sub} on its base instead of the merged weights", w, alt.source.config, dt


def load_model(insp: Inspection, config: dict[str, Any], config_from: str | None, device: str | None = "cpu",
               dtype: str | None = "auto"):
    """Check that the model fits, build it and load the checkpoint. Returns (model, torch.device, torch.dtype)."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover
        raise missing_package("safetensors", "Loading a checkpoint", "pip install safetensors") from None
    dev = resolve_device(device)
    base = base_headers(insp) if insp.source.kind == "adapter" else None
    weights = loaded_weights(insp, base)
    dt = resolve_dtype(dtype, dev, weights.stored_dtype or _config_dtype(config))
    dt_name = str(dt).replace("torch.", "")
    memory.check_fits(weights, config, dev, dt_name, what=insp.source.path, asked=dtype,
                      alternatives=_adapter_alternative(insp))
    model = build_model(config, dev, dt, config_from)
    expected = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    copies, loras = _plan(insp, {k: v for k, v in expected.items() if k not in tied}, base)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for target, (file, key) in copies.items():
        by_file.setdefault(file, []).append((key, target))
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for file, pairs in by_file.items():
            # safetensors maps the file privately (copy-on-write); a tensor in the dtype used on CPU is a view
            # of that mapping, anything else is converted (or moved) as it is read, one tensor at a time
            with safe_open(str(file), framework="pt", device="cpu") as fh:
                for key, target in pairs:
                    t = fh.get_tensor(key)
                    want = expected[target]
                    if t.dtype != want.dtype or dev.type != "cpu":
                        t = t.to(device=dev, dtype=want.dtype)
                    state[target] = t
        if loras:
            _merge_loras(insp, loras, state)
        model.load_state_dict(state, strict=False, assign=True)
        del state
        if tied and hasattr(model, "tie_weights"):
            model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ReplayError(f"{insp.source.weight_files[0]}: {len(left)} model tensors were not loaded from the "
                          f"checkpoint (e.g. {', '.join(left[:3])}); the config from {config_from} builds tensors "
                          f"these weights do not have")
    return model, dev, dt


def _get(ref: tuple[Path, str]) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(ref[0]), framework="pt", device="cpu") as fh:
        return fh.get_tensor(ref[1])


def _merge_loras(insp: Inspection, loras: dict[str, _Lora], params: dict[str, torch.Tensor]) -> None:
    src = insp.source
    fan_in_fan_out = bool((src.adapter_config or {}).get("fan_in_fan_out"))
    ranks = set()
    for mod, lo in loras.items():
        a, b = _get(lo.a).float(), _get(lo.b).float()
        if lo.embedding:  # lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]
            rank = a.shape[0]
            delta = (b @ a).t()
        else:  # lora_A [r, in], lora_B [out, r]
            rank = a.shape[0]
            delta = b @ a
            if fan_in_fan_out:
                delta = delta.t()
        ranks.add(rank)
        scale = _lora_scale(mod, rank, insp)
        w = params[f"{mod}.weight"]
        if tuple(delta.shape) != tuple(w.shape):
            raise ReplayError(f"{lo.a[0]}: LoRA of {mod} gives a {list(delta.shape)} update for a {list(w.shape)} "
                              f"weight; the adapter does not fit this base")
        w.add_((delta * scale).to(device=w.device, dtype=w.dtype))
        if lo.bias is not None and f"{mod}.bias" in params:
            bias = params[f"{mod}.bias"]
            bias.add_((_get(lo.bias).float() * scale).to(device=bias.device, dtype=bias.dtype))
    if src.lora_rank is None and len(ranks) == 1:
        src.lora_rank = ranks.pop()
    src.lora_modules = len(loras)
