"""Benchmark: the Run at scale, peak memory stage by stage, and reading two files at once (run by hand or by
`make bench`).

Issue #10: a run whose only file is a 1 GiB event file, and one whose only file is a 200 MiB trainer_state.json:
the whole `higgs-diag analyze` stays under 1 GB peak (10^9 bytes of RSS). Both runs are bench_analyze's reference
run generated longer by its own generator (`generate_run`, one file each), once, into
benchmarks/_data/run_memory/ (gitignored; `--regenerate` to redo; about 25 s and 1.3 GB of disk).

Each analyze runs in a fresh process that prints VmHWM (the peak RSS so far) after each stage: imports, the
file read, load_run (the frame assembled), the checks (diagnose), the JSON report; the process's peak is its
ru_maxrss (os.wait4). Stages show where the peak is and whose code holds it.

Issue #11 (concurrency): on the reference run (state file + event file), analyze with the event file read in a
forked worker (the default) against the serial read (HIGGS_DIAG_READ_WORKER=0), in alternating pairs of fresh
processes; the median of the pairs' wall-time ratios. The worker can only win with an idle core: 0.85x on the
quiet machine, about 1.0x on the shared, busy one (docs/performance.md).

Usage: python benchmarks/bench_run_memory.py [--regenerate] [--quick] [--pairs N]
  --quick   skip the 1 GiB / 200 MiB runs (only the concurrency pairs)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / "_data" / "run_memory"
sys.path.insert(0, str(HERE))

from _proc import measure  # noqa: E402  (wall s and peak RSS MiB of argv in a fresh process, its stdout)
from _targets import target  # noqa: E402

GOAL_MB = 1e9 / 2**20  # 1 GB = 10^9 bytes, in MiB (ru_maxrss / 1024)
EVENT_BYTES = 1 << 30
STATE_BYTES = 200 << 20
REF_STEPS = 143_361  # bench_analyze's reference run: 46,718,265 event bytes, 36,693,290 state bytes
CASES = {  # name: (steps, state file?, event file?)
    "events_1gib": (int(REF_STEPS * EVENT_BYTES / 46_718_265) + 1, False, True),
    "state_200mib": (int(REF_STEPS * STATE_BYTES / 36_693_290) + 1, True, False),
}

# the child: analyze with VmHWM after each stage, one JSON line at the end
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
stages = []
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def mark(name):
    stages.append((name, round(time.perf_counter() - t0, 2), round(hwm(), 1)))
import higgs_diag.api as api
import higgs_diag.run.load as load
from higgs_diag.report.json_report import render_json
mark("imports")
for mod, fname in ((load, "read_trainer_state"), (__import__("higgs_diag.run.events", fromlist=["x"]), "read_event_file")):
    f = getattr(mod, fname)
    def wrapped(*a, _f=f, _n=fname, **k):
        r = _f(*a, **k)
        mark(_n)
        return r
    setattr(mod, fname, wrapped)
run = api.load_run(sys.argv[1])
mark("load_run")
diag = api.diagnose(run)
mark("checks")
text = render_json(diag)
mark("json report")
print(json.dumps({"stages": stages, "points": run.n_points, "findings": len(diag.findings)}))
"""


def _generate(regenerate: bool) -> dict:
    """Both runs, generated in a child (this process stays small). Returns {name: root}."""
    code = ("import sys; sys.path.insert(0, %r); from pathlib import Path; import bench_analyze as b; "
            "b.generate_run(Path(sys.argv[1]), int(sys.argv[2]), state=sys.argv[3] == '1', "
            "events=sys.argv[4] == '1', force=sys.argv[5] == '1')" % str(HERE))
    roots = {}
    for name, (steps, state, events) in CASES.items():
        root = DATA / name
        subprocess.run([sys.executable, "-c", code, str(root), str(steps), str(int(state)), str(int(events)),
                        str(int(regenerate))], check=True, cwd=str(REPO))
        roots[name] = root
    return roots


def _file_sizes(root: Path) -> str:
    return ", ".join(f"{p.name} {p.stat().st_size / 2**20:,.0f} MiB" for p in sorted(root.rglob("*")) if p.is_file())


def memory_case(name: str, root: Path) -> None:
    m = measure([sys.executable, "-c", CHILD, str(root)])
    if m["rc"] != 0:
        print(f"{name}: exit code {m['rc']}\n{m['stderr'][-3000:]}", file=sys.stderr)
        target(f"#10 {name}: analyze peak RSS", "failed", f"< {GOAL_MB:,.0f} MiB", False)
        return
    out = json.loads(m["stdout"].strip().splitlines()[-1])
    print(f"\n{name} ({_file_sizes(root)}): {out['points']:,} points, {m['wall']:.1f} s, "
          f"peak RSS {m['rss_mb']:,.0f} MiB")
    print(f"  {'stage':22} {'at s':>7} {'VmHWM MiB':>10}")
    for stage, at, hwm in out["stages"]:
        print(f"  {stage:22} {at:7.2f} {hwm:10,.0f}")
    target(f"#10 {name}: analyze peak RSS", f"{m['rss_mb']:,.0f} MiB", f"< {GOAL_MB:,.0f} MiB (1 GB)",
           m["rss_mb"] < GOAL_MB, note=f"{m['wall']:.1f} s, {out['points']:,} points")


def concurrency(pairs: int) -> None:
    ref = HERE / "_data" / "reference_run"
    if not ref.exists():
        subprocess.run([sys.executable, str(HERE / "bench_analyze.py"), "--generate-only"], check=True)
    cli = [str(Path(sys.executable).parent / "higgs-diag"), "analyze", str(ref), "--format", "json"]
    env_worker = {k: v for k, v in os.environ.items() if k != "HIGGS_DIAG_READ_WORKER"}  # the default
    env_serial = {**os.environ, "HIGGS_DIAG_READ_WORKER": "0"}
    measure(cli, env_worker)  # warm the page cache
    ratios, walls = [], {"worker": [], "serial": []}
    for i in range(pairs):
        order = [("worker", env_worker), ("serial", env_serial)]
        for kind, env in (order if i % 2 == 0 else order[::-1]):
            m = measure(cli, env)
            if m["rc"] not in (0, 1):
                print(m["stderr"][-2000:], file=sys.stderr)
            walls[kind].append(m["wall"])
        ratios.append(walls["worker"][-1] / walls["serial"][-1])
    w, s = statistics.median(walls["worker"]), statistics.median(walls["serial"])
    r = statistics.median(ratios)
    print(f"\nreference run, {pairs} alternating pairs: worker {w:.2f} s, serial {s:.2f} s (medians); pair ratios "
          + " ".join(f"{x:.2f}" for x in ratios) + f"; load average {os.getloadavg()[0]:.1f} at the end")
    target("#11 state+event read at once: wall worker/serial", f"{r:.2f}x", "< 0.90x (a real win)", r < 0.90,
           note=f"{w:.2f} s vs {s:.2f} s; needs an idle core")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int, default=7)
    opts = ap.parse_args()
    if opts.quick:
        for name in CASES:
            target(f"#10 {name}: analyze peak RSS", "-", f"< {GOAL_MB:,.0f} MiB (1 GB)", None, note="--quick")
    else:
        for name, root in _generate(opts.regenerate).items():
            memory_case(name, root)
    concurrency(opts.pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
