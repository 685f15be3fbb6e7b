"""Run every benchmark in turn and print one table of their targets (what `make bench` runs).

Runs bench_analyze, bench_checks, bench_growth, bench_triage, bench_replay, bench_batch_validation, then any other
benchmarks/bench_*.py except the by-hand bench_replay_release.py. Each benchmark runs in a fresh process, its
output streamed as it comes; the ``TARGET|`` lines it prints (benchmarks/_targets.py) are collected and shown
together at the end: target, measured, goal, verdict (met / MISSED / not run), then each benchmark's time and the
total. A benchmark that is not there yet is listed as not run.

Exit code: 0 when every benchmark ran to its end, even with targets missed (this is a report); 1 when a
benchmark crashed (nonzero exit code) or could not start.

Usage: python benchmarks/run_all.py [--quick] [--only NAME,...]
  --quick   skip the largest cases: --quick to a benchmark that declares it (bench_growth.py without it: --sizes 1,4)
  --only    a comma-separated subset, by file name without .py (e.g. bench_triage,bench_replay)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _targets import parse  # noqa: E402

# In this order; any other benchmarks/bench_*.py not listed here or in BY_HAND runs after them.
BENCHMARKS = ("bench_analyze", "bench_checks", "bench_growth", "bench_triage", "bench_replay", "bench_batch_validation")
BY_HAND = ("bench_replay_release",)  # ~10 minutes and 12 GB of disk: run it by hand (docs/performance.md)
# --quick: a benchmark that declares --quick gets it; otherwise these arguments (bench_growth: no 16x size)
QUICK_FALLBACK = {"bench_growth": ["--sizes", "1,4"]}


def all_benchmarks() -> list[str]:
    extra = sorted(p.stem for p in HERE.glob("bench_*.py") if p.stem not in BENCHMARKS and p.stem not in BY_HAND)
    return list(BENCHMARKS) + extra


def quick_args(name: str, script: Path) -> list[str]:
    if _accepts(script, "--quick"):
        return ["--quick"]
    fallback = QUICK_FALLBACK.get(name, [])
    return fallback if fallback and _accepts(script, fallback[0]) else []


def _accepts(script: Path, flag: str) -> bool:
    """Does the script declare the option ``flag`` (read from its source: no process started to ask)?"""
    try:
        text = script.read_text()
    except OSError:
        return False
    return f'"{flag}"' in text or f"'{flag}'" in text


def run_one(script: Path, args: list[str]) -> tuple[int, float, str]:
    """Run one benchmark, echo its stdout line by line (stderr goes straight through); (exit code, seconds,
    its stdout)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    lines = []
    try:
        p = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True,
                             errors="replace", cwd=str(HERE.parent), env=env, bufsize=1)
    except OSError as e:
        print(f"run_all: cannot start {script.name}: {e}", flush=True)
        return 127, time.perf_counter() - t, ""
    assert p.stdout is not None
    for line in p.stdout:
        lines.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
    rc = p.wait()
    return rc, time.perf_counter() - t, "".join(lines)


def _table(rows: list[tuple[str, dict]]) -> list[str]:
    heads = ("benchmark", "target", "measured", "goal", "verdict")
    cells = [(b, r["name"], r["measured"], r["goal"], r["verdict"] + (f"  ({r['note']})" if r.get("note") else ""))
             for b, r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads[:4])]
    out = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)) + "  " + heads[4]]
    out.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    for c in cells:
        out.append("  ".join(x.ljust(w) for x, w in zip(c, widths)) + "  " + c[4])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="let benchmarks skip their largest case (--quick)")
    ap.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    a = ap.parse_args(argv)
    names = [n.strip().removesuffix(".py") for n in a.only.split(",") if n.strip()] or all_benchmarks()
    t0 = time.perf_counter()
    rows: list[tuple[str, dict]] = []
    status: list[tuple[str, str, float]] = []
    crashed = False
    for name in names:
        script = HERE / f"{name}.py"
        if not script.is_file():
            print(f"\n=== {name}.py: not present, skipped", flush=True)
            status.append((name, "not present", 0.0))
            rows.append((name, {"name": "(the whole benchmark)", "measured": "-", "goal": "-", "verdict": "not run",
                                "note": "script not present"}))
            continue
        args = quick_args(name, script) if a.quick else []
        print(f"\n=== {name}.py {' '.join(args)}".rstrip(), flush=True)
        rc, secs, out = run_one(script, args)
        found = parse(out)
        if rc != 0:
            crashed = True
            status.append((name, f"CRASHED (exit code {rc})", secs))
        else:
            status.append((name, "ok", secs))
        rows.extend((name, r) for r in found)
        if not found:
            rows.append((name, {"name": "(no target reported)", "measured": "-", "goal": "-", "verdict": "not run",
                                "note": f"exit code {rc}" if rc else "prints no TARGET| line"}))
        elif rc != 0:
            rows.append((name, {"name": "(the rest of the benchmark)", "measured": "-", "goal": "-",
                                "verdict": "not run", "note": f"exit code {rc}"}))
    total = time.perf_counter() - t0
    print("\n=== summary", flush=True)
    for line in _table(rows):
        print(line)
    counts = {v: sum(1 for _, r in rows if r["verdict"] == v) for v in ("met", "MISSED", "not run")}
    print(f"\ntargets: {counts['met']} met, {counts['MISSED']} MISSED, {counts['not run']} not run")
    for name, st, secs in status:
        print(f"  {name + '.py':28} {st:24} {secs:7.1f} s")
    print(f"total time: {total:.1f} s ({total / 60:.1f} min)", flush=True)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
