"""Shared test set-up."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def pytest_sessionstart(session):
    # The corpus tests skip on a machine without ../shared/corpus; CI always has it, so there a missing
    # corpus is an error rather than a silent skip of the "every real file reads" tests.
    if os.environ.get("CI") and not CORPUS.is_dir():
        raise pytest.UsageError(f"CI is set but the shared corpus is missing at {CORPUS}")
