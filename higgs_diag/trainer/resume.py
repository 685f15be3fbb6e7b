"""Resuming under torch >= 2.6: ``rng_state.pth`` holds numpy arrays.

transformers 4.45/4.46 load ``checkpoint-N/rng_state.pth`` with a bare ``torch.load(rng_file)``. Since torch
2.6 that means ``weights_only=True``, and the file holds ``np.random.get_state()`` (a numpy ``uint32`` array),
so resuming fails with ``UnpicklingError: Weights only load failed`` (FACTS.md §1). The fix here allowlists
exactly the four numpy globals that array needs, only for the duration of that one load: the weights-only
protection stays on for everything else in the process, and nothing else is unpickled.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


def rng_state_globals() -> list:
    """The globals a pickled ``np.random.get_state()`` refers to (numpy 1.x and 2.x spellings)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2: numpy._core; numpy 1: numpy.core
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]


@contextlib.contextmanager
def allow_rng_state() -> Iterator[None]:
    """Within this block ``torch.load(weights_only=True)`` also accepts the numpy RNG state. On torch without
    ``torch.serialization.safe_globals`` (< 2.5) ``torch.load`` defaults to full unpickling anyway."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is None:  # pragma: no cover - torch < 2.5
        yield
        return
    with scoped(rng_state_globals()):
        yield


def load_rng_state_safely(load: Callable[[str], None], checkpoint: str | None) -> None:
    """Run the Trainer's ``_load_rng_state(checkpoint)`` (passed as ``load``) with the RNG globals allowed."""
    with allow_rng_state():
        load(checkpoint)
