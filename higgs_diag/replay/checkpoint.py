"""Find out what a checkpoint folder holds, offline and without torch: only JSON files and safetensors headers
are read, nothing is unpickled, nothing is downloaded.

Four layouts are recognised (the ones the HF Trainer and the community Higgs trainers write):

* a full model: ``config.json`` + ``model.safetensors`` (or ``model.safetensors.index.json`` + shards);
* a PEFT adapter: ``adapter_config.json`` + ``adapter_model.safetensors``, on a base model folder given by
  ``--base`` or by the adapter's ``base_model_name_or_path`` when that is a local folder;
* a wrapper module's state dict: one ``model.safetensors`` whose keys carry the wrapper's attribute prefix
  (``model.embed_tokens.weight``) and, around a PEFT model, LoRA weights
  (``model.base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight``), without adapter files;
* an adapter under ``checkpoint-N/lora_adapters/`` (what community trainers save next to the wrapper).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..layout import (ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS, LORA_ADAPTERS_DIR, MODEL_CONFIG,
                      PICKLE_WEIGHTS, SAFETENSORS_INDEX, SAFETENSORS_WEIGHTS, TRAINER_STATE, checkpoint_step_of)
from .errors import ReplayError
from ..evidence import ModelSource
from .safetensors_header import read_header

ANCHORS = ("audio_codebook_embeddings.weight", "embed_tokens.weight")  # keys every HiggsAudioModel has
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

# PEFT's task_type -> the class PeftModel.from_pretrained / get_peft_model builds (peft.mapping).
PEFT_CLASS_BY_TASK = {
    None: "PeftModel",
    "CAUSAL_LM": "PeftModelForCausalLM",
    "SEQ_2_SEQ_LM": "PeftModelForSeq2SeqLM",
    "SEQ_CLS": "PeftModelForSequenceClassification",
    "TOKEN_CLS": "PeftModelForTokenClassification",
    "QUESTION_ANS": "PeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "PeftModelForFeatureExtraction",
}


def _read_json(p: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ReplayError(f"{p}: cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReplayError(f"{p}: not valid JSON ({str(e).splitlines()[0][:120]}); expected a JSON object ({what})") from None
    if not isinstance(obj, dict):
        raise ReplayError(f"{p}: expected a JSON object ({what}), got {type(obj).__name__}")
    return obj


def step_of(folder: Path) -> int | None:
    """The training step of a checkpoint folder: from its name (or its parent's), else its trainer_state.json."""
    step = checkpoint_step_of(folder)
    if step is not None:
        return step
    ts = folder / TRAINER_STATE
    if ts.is_file():  # the run reader's own parse: bounded, range-checked (a global_step of Infinity is None)
        from ..run.trainer_state import read_trainer_state

        info = read_trainer_state(ts).info
        return info.global_step if info is not None else None
    return None


def weight_files(folder: Path) -> list[Path]:
    """The model weights of a folder: ``model.safetensors`` or the shards of its index; [] when none."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        wm = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ReplayError(f"{index}: has no weight_map")
        files = []
        for name in dict.fromkeys(wm.values()):
            p = folder / str(name)
            if Path(str(name)).name != str(name) or not p.is_file():
                raise ReplayError(f"{index}: names the shard {name!r}, which is not in {folder}")
            files.append(p)
        return files
    single = folder / SAFETENSORS_WEIGHTS
    return [single] if single.is_file() else []


def headers(files: list[Path]) -> dict[str, tuple[Path, list[int], str]]:
    """{tensor name: (file, shape, dtype)} over all files."""
    out: dict[str, tuple[Path, list[int], str]] = {}
    for f in files:
        h, _ = read_header(f)
        for name, info in h.items():
            out[name] = (f, list(info["shape"]), str(info.get("dtype")))
    return out


@dataclass
class LoraKey:
    module: str  # module path without any prefix, e.g. layers.0.self_attn.q_proj
    part: str  # lora_A | lora_B | lora_embedding_A | lora_embedding_B | lora_magnitude_vector
    adapter: str | None
    param: str | None  # weight | bias | None (ParameterDict entries)


def parse_lora_key(key: str) -> LoraKey | None:
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p in LORA_PARTS and i > 0:
            rest = parts[i + 1:]
            if rest and rest[-1] in ("weight", "bias"):
                param, adapter = rest[-1], (rest[0] if len(rest) == 2 else None)
                if len(rest) > 2:
                    return None
            else:
                if len(rest) > 1:
                    return None
                param, adapter = None, (rest[0] if rest else None)
            return LoraKey(".".join(parts[:i]), p, adapter, param)
    return None


def normalize_base_key(key: str) -> str | None:
    """A peft-wrapped base key -> the plain model key (``x.base_layer.weight`` -> ``x.weight``,
    ``x.modules_to_save.default.weight`` -> ``x.weight``); None for keys to skip (``original_module``)."""
    if ".original_module." in key:
        return None
    key = key.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)


def detect_prefix(names: list[str], file: Path) -> str:
    """The prefix in front of the HiggsAudioModel keys (``""`` for a full model, ``model.`` for a wrapper,
    ``model.base_model.model.`` for a wrapper around a PEFT model)."""
    plain = [n for n in (normalize_base_key(k) for k in names if parse_lora_key(k) is None) if n]
    for anchor in ANCHORS:
        hits = [k[: -len(anchor)] for k in plain if k == anchor or k.endswith("." + anchor)]
        if hits:
            return min(hits, key=len)
    sample = ", ".join(names[:4])
    raise ReplayError(f"{file}: its keys do not look like a HiggsAudioModel (no {ANCHORS[0]} under any prefix; "
                      f"keys such as {sample}); pass a Higgs Audio checkpoint")


@dataclass
class Inspection:
    """ModelSource plus what loading needs (file headers, paths)."""

    source: ModelSource
    folder: Path
    tensors: dict[str, tuple[Path, list[int], str]] = field(default_factory=dict)  # the checkpoint's own
    adapter_dir: Path | None = None


def _find_adapter_config(dirs: list[Path]) -> Path | None:
    for d in dirs:
        p = d / ADAPTER_CONFIG
        if p.is_file():
            return p
    return None


def _resolve_base(name: str | None, adapter_dir: Path, adapter_cfg: Path) -> Path:
    if not name:
        raise ReplayError(f"{adapter_cfg}: base_model_name_or_path is not set; pass --base PATH (a local folder "
                          f"with the base model's config.json and model.safetensors)")
    p = Path(os.path.expanduser(name))
    ancestors = [adapter_dir.resolve(), *adapter_dir.resolve().parents]
    candidates = [p] if p.is_absolute() else [Path.cwd() / p]
    # The path was recorded relative to the training process's folder (or on another machine): after the run
    # was moved or copied, its tail (e.g. "base" of "runs/exp1/base") is found next to the adapter's folders.
    tails = [Path(*p.parts[i:]) for i in range(len(p.parts)) if not Path(*p.parts[i:]).is_absolute()]
    candidates += [a / t for t in tails for a in ancestors]
    for c in candidates:
        if c.is_dir() and (c / MODEL_CONFIG).is_file():
            return c
    looks_hub = not p.is_absolute() and len(p.parts) == 2 and not name.startswith(".")
    where = "a hub id" if looks_hub else "not a local folder with config.json"
    raise ReplayError(f"{adapter_cfg}: the base model {name!r} is {where} (looked in the current folder and the "
                      f"adapter's parent folders); higgs-diag never downloads: pass --base PATH to a local copy "
                      f"(config.json + model.safetensors)")


def inspect_checkpoint(path: str | os.PathLike, *, base: str | os.PathLike | None = None,
                       run_root: str | os.PathLike | None = None, lora_alpha: float | None = None) -> Inspection:
    """Classify a checkpoint folder (or a ``.safetensors`` file in one). Raises ReplayError with what to pass."""
    p = Path(path)
    if not p.exists():
        raise ReplayError(f"{p}: no such checkpoint folder")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ReplayError(f"{p}: not a checkpoint folder; pass the folder that holds config.json + "
                              f"model.safetensors or adapter_config.json + adapter_model.safetensors")
        folder, files = p.parent, [p]
    else:
        folder, files = p, None
    names = sorted(os.listdir(folder))

    adapter_cfg = folder / ADAPTER_CONFIG if files is None else None
    if adapter_cfg is not None and adapter_cfg.is_file():
        # higgs_diag.trainer saves a wrapper's full state dict *and* the adapter files into one folder: the
        # self-contained state dict wins (no base needed), the adapter_config.json gives its lora_alpha
        own = weight_files(folder)
        if not (own and any(parse_lora_key(k) is not None for k in headers(own))):
            return _inspect_adapter(folder, adapter_cfg, base, run_root)
        files = own
    files = files if files is not None else weight_files(folder)
    if not files:
        sub = folder / LORA_ADAPTERS_DIR
        if (sub / ADAPTER_CONFIG).is_file():
            return _inspect_adapter(sub, sub / ADAPTER_CONFIG, base, run_root)
        pickles = [n for n in PICKLE_WEIGHTS if n in names]
        if pickles:
            raise ReplayError(f"{folder}: holds {pickles[0]}, a pickle; higgs-diag loads weights only from "
                              f".safetensors and never unpickles: save with save_safetensors=True (the Trainer's "
                              f"default) or convert the file to model.safetensors")
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") if names else "nothing"
        raise ReplayError(f"{folder}: holds no model weights (found: {shown}); expected config.json + "
                          f"model.safetensors (a full model), adapter_config.json + adapter_model.safetensors (a PEFT "
                          f"adapter, with --base), or a wrapper's model.safetensors")
    tensors = headers(files)
    keys = list(tensors)
    prefix = detect_prefix(keys, files[0])
    loras = [k for k in keys if parse_lora_key(k) is not None]
    kind = "wrapper-lora" if loras else ("full" if prefix == "" else "wrapper")
    src = ModelSource(path=str(p), kind=kind, model_class="HiggsAudioModel" if kind == "full" else "wrapper",
                      step=step_of(folder), weight_files=[str(f) for f in files], n_tensors=len(keys), prefix=prefix,
                      checkpoint_dtype=_dtype_of(tensors))
    cfg = folder / MODEL_CONFIG
    if cfg.is_file():
        src.config, src.config_from = _read_json(cfg, "model config"), str(cfg)
        arch = src.config.get("architectures")
        if kind == "full" and isinstance(arch, list) and arch:
            src.model_class = str(arch[0])
    elif base is not None:
        bcfg = Path(base) / MODEL_CONFIG
        if not bcfg.is_file():
            raise ReplayError(f"{base}: --base must be a folder with config.json")
        src.config, src.config_from = _read_json(bcfg, "model config"), str(bcfg)
    if kind == "wrapper":
        src.notes.append(f"keys carry the wrapper prefix {prefix!r}; mapped onto HiggsAudioModel")
    if kind == "wrapper-lora":
        _lora_from_state(src, keys, folder, run_root, lora_alpha)
    return Inspection(source=src, folder=folder, tensors=tensors)


def _dtype_of(tensors: dict[str, tuple[Path, list[int], str]]) -> str | None:
    counts: dict[str, int] = {}
    for _, shape, dt in tensors.values():
        n = 1
        for s in shape:
            n *= int(s)
        counts[dt] = counts.get(dt, 0) + n
    return max(counts, key=counts.get) if counts else None


def _lora_from_state(src: ModelSource, keys: list[str], folder: Path, run_root, lora_alpha) -> None:
    """A wrapper state dict with LoRA weights: rank from the shapes, alpha from an adapter_config.json near it
    (``checkpoint-N/lora_adapters/``, the run folder) or ``--lora-alpha``."""
    adapters = {lk.adapter for lk in (parse_lora_key(k) for k in keys) if lk is not None}
    if len(adapters) > 1:
        raise ReplayError(f"{src.weight_files[0]}: holds LoRA weights of several adapters ({', '.join(sorted(map(str, adapters)))}); "
                          f"replay merges one: save the active adapter alone")
    mods = {parse_lora_key(k).module for k in keys if parse_lora_key(k) is not None}
    src.lora_modules = len(mods)
    dirs = [folder / LORA_ADAPTERS_DIR, folder]
    if run_root is not None:
        dirs += [Path(run_root), Path(run_root) / LORA_ADAPTERS_DIR]
    found = _find_adapter_config(dirs)
    if lora_alpha is not None:
        src.lora_alpha, src.lora_alpha_from = float(lora_alpha), "--lora-alpha"
    elif found is not None:
        cfg = _read_json(found, "adapter config")
        src.adapter_config, src.adapter_config_from = cfg, str(found)
        src.lora_alpha, src.lora_alpha_from = cfg.get("lora_alpha"), str(found)
    else:
        raise ReplayError(f"{src.weight_files[0]}: holds LoRA weights ({len(mods)} modules) but no adapter_config.json "
                          f"says their lora_alpha (looked in {', '.join(str(d) for d in dirs)}); pass --lora-alpha N "
                          f"(the LoraConfig(lora_alpha=...) of the training script)")


def _inspect_adapter(adapter_dir: Path, adapter_cfg: Path, base, run_root) -> Inspection:
    cfg = _read_json(adapter_cfg, "adapter config")
    peft_type = str(cfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise ReplayError(f"{adapter_cfg}: peft_type {peft_type} is not supported (replay merges LoRA adapters); "
                          f"merge it into the base (merge_and_unload) and save a full model")
    if cfg.get("use_dora"):
        raise ReplayError(f"{adapter_cfg}: DoRA adapters are not supported; merge it into the base "
                          f"(merge_and_unload) and save a full model")
    st = adapter_dir / ADAPTER_WEIGHTS
    if not st.is_file():
        if (adapter_dir / ADAPTER_PICKLE).is_file():
            raise ReplayError(f"{adapter_dir / ADAPTER_PICKLE}: a pickle; higgs-diag loads adapters only from "
                              f"adapter_model.safetensors and never unpickles (save_pretrained(safe_serialization=True))")
        raise ReplayError(f"{adapter_dir}: has adapter_config.json but no adapter_model.safetensors")
    tensors = headers([st])
    task = cfg.get("task_type")
    model_class = PEFT_CLASS_BY_TASK.get(task, f"PeftModel ({task})")
    if base is not None:
        base_dir, base_from = Path(base), "--base"
        if not (base_dir.is_dir() and (base_dir / MODEL_CONFIG).is_file()):
            raise ReplayError(f"{base_dir}: --base must be a folder with config.json and model.safetensors")
    else:
        base_dir, base_from = _resolve_base(cfg.get("base_model_name_or_path"), adapter_dir, adapter_cfg), \
            "adapter_config.json base_model_name_or_path"
    base_files = weight_files(base_dir)
    if not base_files:
        raise ReplayError(f"{base_dir}: the base model folder holds no model.safetensors (pass --base PATH to the "
                          f"base model's local copy)")
    src = ModelSource(path=str(adapter_dir), kind="adapter", model_class=model_class, step=step_of(adapter_dir),
                      weight_files=[str(f) for f in base_files] + [str(st)], n_tensors=len(tensors),
                      base=str(base_dir), base_from=base_from, adapter_config=cfg,
                      adapter_config_from=str(adapter_cfg), prefix="base_model.model.",
                      lora_rank=cfg.get("r"), lora_alpha=cfg.get("lora_alpha"), lora_alpha_from=str(adapter_cfg),
                      checkpoint_dtype=_dtype_of(tensors))
    src.config, src.config_from = _read_json(base_dir / MODEL_CONFIG, "model config"), str(base_dir / MODEL_CONFIG)
    src.lora_modules = len({lk.module for lk in (parse_lora_key(k) for k in tensors) if lk is not None})
    return Inspection(source=src, folder=adapter_dir, tensors=tensors, adapter_dir=adapter_dir)
