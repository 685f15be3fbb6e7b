"""Errors of the replay: each message is one line that names the file and what to pass instead."""
from __future__ import annotations


class ReplayError(Exception):
    """Input the replay cannot use (exit code 2): a checkpoint, base, batch or option problem."""


def missing_package(name: str, purpose: str, install: str) -> ReplayError:
    return ReplayError(f"{purpose} needs the {name} package, which is not installed ({install})")
