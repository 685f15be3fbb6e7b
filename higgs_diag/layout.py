"""The on-disk layout of a Hugging Face Trainer run: folder and file names, said once.

An ``output_dir`` holds ``checkpoint-<step>/`` folders (``last-checkpoint/`` when pushed with
``hub_strategy="checkpoint"``), the Trainer's files and, under ``runs/``, TensorBoard event files named
``events.out.tfevents.<time>.<host>...``. A checkpoint folder holds a full model (``model.safetensors`` or
``pytorch_model.bin``, or an index of their shards), a PEFT adapter (``adapter_model.*`` +
``adapter_config.json``, or the same under ``lora_adapters/`` as community Higgs trainers save it), the
Trainer's state and the resume pickles.

Standard library only: the run reader, the checks and replay all import it, none of them needs torch for it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "CHECKPOINT_PREFIX", "CHECKPOINT_RE", "LAST_CHECKPOINT", "LOGGING_DIR", "EVENT_FILE_MARK",
    "MODEL_CONFIG", "TRAINER_STATE", "TRAINING_ARGS", "OPTIMIZER", "SCHEDULER",
    "SAFETENSORS_WEIGHTS", "SAFETENSORS_INDEX", "PICKLE_WEIGHTS_FILE", "PICKLE_INDEX",
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_PICKLE", "ADAPTER_WEIGHTS_STEM", "LORA_ADAPTERS_DIR",
    "FULL_MODEL_FILES", "ADAPTER_FILES", "PICKLE_WEIGHTS", "CHECKPOINT_MARKERS",
    "checkpoint_name", "checkpoint_step", "step_in_path", "is_checkpoint_name", "checkpoint_step_of",
    "is_checkpoint_dir", "has_checkpoint_folders", "has_full_model", "has_adapter", "is_rng_state",
    "is_event_file",
]

# ---- the output_dir ----------------------------------------------------------------------------
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # a checkpoint folder's whole name
_STEP_IN_PATH = re.compile(r"checkpoint-(\d+)")  # anywhere in a path (trainer_state's best_model_checkpoint)
LAST_CHECKPOINT = "last-checkpoint"
LOGGING_DIR = "runs"  # TrainingArguments.logging_dir's default: <output_dir>/runs/<date>_<host>/
EVENT_FILE_MARK = "events.out.tfevents."

# ---- a checkpoint folder -----------------------------------------------------------------------
MODEL_CONFIG = "config.json"
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"  # a pickle
OPTIMIZER = "optimizer.pt"  # a pickle
SCHEDULER = "scheduler.pt"  # a pickle
_RNG_STATE = ("rng_state", ".pth")  # rng_state.pth, rng_state_<rank>.pth: pickles

SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"  # + the shards it names
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
FULL_MODEL_FILES = (SAFETENSORS_WEIGHTS, PICKLE_WEIGHTS_FILE, SAFETENSORS_INDEX, PICKLE_INDEX)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
ADAPTER_WEIGHTS_STEM = "adapter_model."  # adapter_model.safetensors / adapter_model.bin
LORA_ADAPTERS_DIR = "lora_adapters"  # checkpoint-N/lora_adapters/: an adapter saved next to a wrapper's weights
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_PICKLE, ADAPTER_CONFIG)

# weight files higgs-diag never loads (unpickling runs code)
PICKLE_WEIGHTS = (PICKLE_WEIGHTS_FILE, ADAPTER_PICKLE, PICKLE_INDEX)
# any of these in a folder: it holds a model, an adapter or a model config (a checkpoint to replay)
CHECKPOINT_MARKERS = (MODEL_CONFIG, SAFETENSORS_WEIGHTS, SAFETENSORS_INDEX, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                      LORA_ADAPTERS_DIR, PICKLE_WEIGHTS_FILE, ADAPTER_PICKLE)


def checkpoint_name(step: int) -> str:
    """The folder name the Trainer saves step ``step`` into: ``checkpoint-<step>``."""
    return f"{CHECKPOINT_PREFIX}{int(step)}"


def checkpoint_step(name: str | os.PathLike) -> int | None:
    """The step of a ``checkpoint-<step>`` folder (its name, or a path ending in it); None for any other name
    (``last-checkpoint`` included: its step is in its trainer_state.json)."""
    m = CHECKPOINT_RE.match(Path(name).name)
    return int(m.group(1)) if m else None


def step_in_path(text: str | os.PathLike | None) -> int | None:
    """The step of the first ``checkpoint-<step>`` anywhere in a path (``out/checkpoint-500``, as in
    trainer_state.json's best_model_checkpoint); None when there is none."""
    if text is None:
        return None
    m = _STEP_IN_PATH.search(str(text))
    return int(m.group(1)) if m else None


def is_checkpoint_name(name: str | os.PathLike) -> bool:
    """True for a checkpoint folder's name: ``checkpoint-<step>`` or ``last-checkpoint``."""
    base = Path(name).name
    return base == LAST_CHECKPOINT or CHECKPOINT_RE.match(base) is not None


def checkpoint_step_of(folder: str | os.PathLike) -> int | None:
    """The step a folder's name says: its own ``checkpoint-<step>``, else its parent's (an adapter in
    ``checkpoint-<step>/lora_adapters/``); None when neither is named so."""
    p = Path(folder)
    for d in (p, p.parent):
        step = checkpoint_step(d.name)
        if step is not None:
            return step
    return None


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True for a folder holding any of CHECKPOINT_MARKERS (a model, an adapter or a model config)."""
    p = Path(path)
    return p.is_dir() and any((p / m).exists() for m in CHECKPOINT_MARKERS)


def has_checkpoint_folders(folder: str | os.PathLike) -> bool:
    """True when ``folder`` (an output_dir) holds a ``checkpoint-<step>/`` or ``last-checkpoint/`` folder."""
    try:
        with os.scandir(folder) as it:
            return any(is_checkpoint_name(e.name) and e.is_dir() for e in it)
    except OSError:
        return False


def has_full_model(files) -> bool:
    """Given a checkpoint's file names (relative to it, ``/``-separated): whether it holds a full model's
    weights (or their index) at its top level."""
    names = set(files)
    return any(f in names for f in FULL_MODEL_FILES)


def has_adapter(files) -> bool:
    """Given a checkpoint's file names (relative to it, ``/``-separated): whether it holds adapter weights
    (``adapter_model.*``) or anything under ``lora_adapters/``."""
    return any(f.startswith((ADAPTER_WEIGHTS_STEM, LORA_ADAPTERS_DIR + "/")) for f in files)


def is_rng_state(name: str) -> bool:
    """True for an RNG state file the Trainer saves per process (``rng_state.pth``, ``rng_state_3.pth``)."""
    return name.startswith(_RNG_STATE[0]) and name.endswith(_RNG_STATE[1])


def is_event_file(name: str | os.PathLike) -> bool:
    """True for a TensorBoard event file name (``events.out.tfevents.<time>.<host>...``), or a path ending in one."""
    return EVENT_FILE_MARK in os.path.basename(str(name))
