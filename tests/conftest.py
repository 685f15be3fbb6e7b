"""Shared test set-up."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# The tests train and replay a 33k-parameter model: one thread is as fast as two, and a second thread that
# spin-waits for a core another process holds makes a training step ten times slower on a shared 2-core
# machine (measured: 395 steps in 98 s with 2 threads under load, 8.7 s with 1). Child processes (torchrun,
# the CLI in a subprocess) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the analyze-only tests run without torch
    pass

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def pytest_sessionstart(session):
    # The corpus tests skip on a machine without ../shared/corpus; CI always has it, so there a missing
    # corpus is an error rather than a silent skip of the "every real file reads" tests.
    if os.environ.get("CI") and not CORPUS.is_dir():
        raise pytest.UsageError(f"CI is set but the shared corpus is missing at {CORPUS}")
