"""One format for a benchmark's verdict against its target, so that `make bench` can gather them all.

Each benchmark script calls :func:`target` once per target it measures. It prints one human line and one
machine line::

    [met   ] one run: analyze wall time          0.93 s   target <= 1.0 s
    TARGET|one run: analyze wall time|0.93 s|<= 1.0 s|met

``benchmarks/run_all.py`` (what `make bench` runs) collects the ``TARGET|`` lines of every script and prints
them as one table at the end. A target that could not be measured is reported with ``ok=None`` ("not run").
"""
from __future__ import annotations

import sys

PREFIX = "TARGET|"


def target(name: str, measured: str, goal: str, ok: bool | None, note: str = "") -> None:
    """Print the verdict for one target: ``measured`` and ``goal`` are already formatted with their units."""
    word = "not run" if ok is None else ("met" if ok else "MISSED")
    extra = f"  ({note})" if note else ""
    print(f"[{word:7}] {name:45} {measured:>14}   target {goal}{extra}", flush=True)
    clean = lambda s: str(s).replace("|", "/").replace("\n", " ")  # noqa: E731
    print(f"{PREFIX}{clean(name)}|{clean(measured)}|{clean(goal)}|{word}|{clean(note)}", flush=True)
    sys.stdout.flush()


def parse(text: str) -> list[dict]:
    """The targets printed in ``text`` (a benchmark's stdout), in order."""
    rows = []
    for line in text.splitlines():
        if line.startswith(PREFIX):
            parts = (line[len(PREFIX):].split("|") + [""] * 5)[:5]
            rows.append(dict(zip(("name", "measured", "goal", "verdict", "note"), parts)))
    return rows
