"""Benchmark: the rules of `higgs-diag analyze` on the reference run (issue #11 target 1; run by hand).

The reference run is bench_analyze.py's (143,361 steps, 861k points in each of trainer_state.json and the event
file; generated into benchmarks/_data/ when missing). It is read once; then `run_checks` runs on fresh copies of
the Run (nothing cached between repetitions: `Run.series` caches per Run). What analyze pays is the first call in
a fresh process (it imports the rule modules and warms pandas' paths on the frame), so each repetition is a child
process that reads the run and times one `run_checks`; the median of those is held against the target. The
in-process repetitions after a first call are printed for information.

Target: all checks together <= 0.25 s on this run.

Usage: python benchmarks/bench_checks.py [--repeat N] [--profile]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _proc import installed_env  # noqa: E402
from _targets import target  # noqa: E402

GOAL_S = 0.25


def fresh(run):
    """The same Run without its series cache (what analyze's single call starts from)."""
    return dataclasses.replace(run, _series_cache={})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one call instead")
    a = ap.parse_args()

    import bench_analyze
    bench_analyze.generate()
    from higgs_diag import load_run

    run = load_run(bench_analyze.RUN)
    if not a.child:
        print(f"reference run: {run.n_points:,} points", flush=True)
    from higgs_diag.checks import run_checks

    if a.profile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        run_checks(fresh(run))
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(r"checks|collapse|model\.py", 40)
        return
    t0, c0 = time.perf_counter(), time.process_time()
    first = run_checks(fresh(run))
    t_first, c_first = time.perf_counter() - t0, time.process_time() - c0
    if a.child:
        print(f"CHILD {t_first:.6f} {c_first:.6f}")
        return
    times = []
    for _ in range(a.repeat):
        r = fresh(run)
        t0 = time.perf_counter()
        fs = run_checks(r)
        times.append(time.perf_counter() - t0)
        assert [f.to_dict() if hasattr(f, "to_dict") else repr(f) for f in fs] == \
            [f.to_dict() if hasattr(f, "to_dict") else repr(f) for f in first]
    warm = statistics.median(times)
    print(f"in this process: first call {t_first:.3f} s; then median of {a.repeat} {warm:.3f} s "
          f"(min {min(times):.3f}, max {max(times):.3f}); {len(first)} findings", flush=True)
    # the children run higgs-diag as installed, with its .pyc files (the rule modules would otherwise be compiled
    # again, ~50 ms of the first call); one warm-up child fills the cache
    env = installed_env("checks")
    subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, check=True, env=env)
    cold, cpu = [], []
    for _ in range(a.repeat):
        out = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, check=True,
                             env=env).stdout
        line = next(ln.split() for ln in out.splitlines() if ln.startswith("CHILD "))
        cold.append(float(line[1]))
        cpu.append(float(line[2]))
    med, med_cpu = statistics.median(cold), statistics.median(cpu)
    print(f"first call in a fresh process (what analyze pays): median of {a.repeat} {med:.3f} s wall "
          f"(min {min(cold):.3f}, max {max(cold):.3f}), {med_cpu:.3f} s CPU (min {min(cpu):.3f})", flush=True)
    # the verdict is on wall time; on a shared machine the CPU time says what the checks themselves cost
    target("checks: run_checks on the reference run", f"{med:.3f} s", f"<= {GOAL_S} s", med <= GOAL_S,
           note=f"first call in a fresh process, median of {a.repeat}; CPU {med_cpu:.3f} s; warm {warm:.3f} s")


if __name__ == "__main__":
    main()
