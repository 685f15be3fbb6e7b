"""The collator guard: samples are copied before the collator sees them.

boson_multimodal's ``HiggsAudioSampleCollator`` writes into the samples it is given (``label_ids`` of the
``<|AUDIO_OUT|>`` token and of untrained turns become -100, FACTS.md §1). A dataset that returns the same
sample objects every epoch (a cache, a list of ``ChatMLDatasetSample``) then loses every audio label the
second time a sample is collated. ``guard_collator`` hands the collator fresh copies of the tensors.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Callable

import torch

from ..batch import as_dict


def copy_sample(sample: Any) -> Any:
    """A copy of one dataset sample whose tensors can be written to without touching the original: tensors
    are cloned; dicts, lists, tuples, dataclasses (``ChatMLDatasetSample``) and plain objects are copied
    one level at a time; everything else is deep-copied."""
    if isinstance(sample, torch.Tensor):
        return sample.clone()
    if isinstance(sample, Mapping):
        items = {k: copy_sample(v) for k, v in sample.items()}
        return items if type(sample) is dict else type(sample)(items)
    if isinstance(sample, (list, tuple)) and not hasattr(sample, "_fields"):
        return type(sample)(copy_sample(v) for v in sample)
    if not isinstance(sample, type) and hasattr(sample, "__dict__"):  # dataclasses, plain objects
        new = copy.copy(sample)
        for k, v in vars(sample).items():
            if isinstance(v, (torch.Tensor, Mapping, list, tuple)):
                setattr(new, k, copy_sample(v))
        return new
    return copy.deepcopy(sample)


class GuardedCollator:
    """Calls ``collator`` on copies of the samples; with ``to_dict=True`` returns the batch as a plain dict
    (a ``HiggsAudioBatchInput`` has no ``len``/``get``/``in``, which the HF Trainer uses, FACTS.md §2).
    Attribute lookups fall through to the wrapped collator (``use_delay_pattern``, ``audio_num_codebooks``...)."""

    def __init__(self, collator: Callable, to_dict: bool = False):
        self.collator = collator
        self.to_dict = to_dict

    def __call__(self, samples):
        batch = self.collator([copy_sample(s) for s in samples])
        return as_dict(batch) if self.to_dict else batch

    def __getattr__(self, name):
        if name in ("collator", "to_dict") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __repr__(self):
        return f"GuardedCollator({self.collator!r})"


def guard_collator(collator: Callable, *, to_dict: bool = False) -> GuardedCollator:
    """Wrap a collator so that it never mutates the dataset's samples (idempotent)."""
    if isinstance(collator, GuardedCollator):
        if to_dict and not collator.to_dict:
            return GuardedCollator(collator.collator, to_dict=True)
        return collator
    return GuardedCollator(collator, to_dict=to_dict)


def unwrap_collator(collator: Any) -> Any:
    """The user's collator inside a GuardedCollator / HF RemoveColumnsCollator."""
    seen = 0
    while seen < 5:
        inner = None
        if isinstance(collator, GuardedCollator):
            inner = collator.collator
        elif type(collator).__name__ == "RemoveColumnsCollator":
            inner = getattr(collator, "data_collator", None)
        if inner is None:
            return collator
        collator, seen = inner, seen + 1
    return collator
