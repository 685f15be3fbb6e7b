"""Benchmark: the trainer_state.json reader (issue #11 targets 1-2, issue #10 memory); run by hand or by `make bench`.

1. Speed: ``read_trainer_state`` on the reference run's 36.7 MB state file (143,361 steps) against the reader
   before the fast path (tests/_trainer_state_old.py, kept verbatim), alternating in one process (the machine is
   shared: the ratio is what counts). Target <= 0.25 s.
2. Memory: the reader alone in a fresh process (ru_maxrss) on the reference run generated longer by bench_analyze's
   own generator (state file only): 200 MiB (issue #10: < 1 GB peak for the whole analyze; the reader's share
   here) and 16x the reference (a ~600 MB file; issue #11: read with nothing dropped). Every point the generator
   wrote must be read. Files go to benchmarks/_data/state_sizes/ (gitignored, about 1 GB; `--regenerate`).

Usage: python benchmarks/bench_state.py [--regenerate] [--rounds N] [--no-memory] [--quick]
  --quick   memory on the 200 MiB file only (not the 16x one)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from _targets import target  # noqa: E402

REF_STEPS = 143_361
REF_BYTES = 36_693_290
SIZES = {"200 MiB": int(REF_STEPS * (200 << 20) / REF_BYTES) + 1, "16x (~600 MB)": 16 * REF_STEPS}

CHILD = r"""
import json, resource, sys, time
t = time.perf_counter()
from higgs_diag.run.trainer_state import read_trainer_state
r = read_trainer_state(sys.argv[1])
print(json.dumps({"s": time.perf_counter() - t, "points": len(r.steps), "problems": [str(p) for p in r.problems],
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def speed(rounds: int) -> None:
    import bench_analyze
    import _trainer_state_old as old
    from higgs_diag.run.trainer_state import read_trainer_state

    meta = bench_analyze.generate_run(HERE / "_data" / "reference_run", REF_STEPS)
    path = meta["state_path"]
    new_t, old_t = [], []
    read_trainer_state(path)  # warm the page cache and the imports
    for _ in range(rounds):
        t = time.perf_counter()
        a = read_trainer_state(path)
        new_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = old.read_trainer_state(path)
        old_t.append(time.perf_counter() - t)
    assert a.values.tobytes() == b.values.tobytes() and list(a.metrics) == list(b.metrics)
    best_new, best_old = min(new_t), min(old_t)
    print(f"reference state file: new {[round(x, 3) for x in new_t]} s, old {[round(x, 3) for x in old_t]} s")
    target("#11 read_trainer_state, reference (36.7 MB)", f"{best_new:.3f} s", "<= 0.25 s", best_new <= 0.25,
           note=f"old reader {best_old:.3f} s in the same process: {best_old / best_new:.1f}x; "
                f"{len(a.steps):,} points")


def memory(regenerate: bool, quick: bool) -> None:
    import bench_analyze

    for name, steps in list(SIZES.items())[:1 if quick else None]:
        root = HERE / "_data" / "state_sizes" / f"steps_{steps}"
        meta = bench_analyze.generate_run(root, steps, state=True, events=False, force=regenerate)
        path = Path(meta["state_path"])
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, cwd=str(REPO),
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        wall = time.perf_counter() - t
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            target(f"#10/#11 state {name}: read peak RSS", "failed", "< 1,000 MB", False)
            continue
        out = json.loads(p.stdout.strip().splitlines()[-1])
        expect = meta.get("state_points")
        whole = expect is None or out["points"] == expect
        size = path.stat().st_size / 2**20
        print(f"state {name}: {size:,.0f} MiB, {out['points']:,} points (written {expect}), read {out['s']:.1f} s, "
              f"process {wall:.1f} s, peak RSS {out['rss_mb']:,.0f} MiB, problems {out['problems']}")
        target(f"#10/#11 state {name}: read peak RSS", f"{out['rss_mb']:,.0f} MiB", "< 954 MiB (1 GB)",
               out["rss_mb"] < 1e9 / 2**20 and whole and not out["problems"],
               note=f"{size:,.0f} MiB file, {out['points']:,} points{'' if whole else ' (POINTS MISSING)'}, "
                    f"{out['s']:.1f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    speed(a.rounds)
    if not a.no_memory:
        memory(a.regenerate, a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
