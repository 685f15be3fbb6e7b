"""Benchmark: how `higgs-diag analyze` grows with the run (run by hand; issue #11 target 2, issue #10's cases).

Generates (once, into benchmarks/_data/growth/, gitignored; each in a child process so that this one stays
small) the reference run of bench_analyze.py at 1x, 4x and 16x its length (143,361 steps at 1x: a 36.7 MB
trainer_state.json and a 46.7 MB event file; 16x is about 600 MB + 750 MB), and issue #10's two cases:

    event_1gib    a run whose only file is a 1 GiB event file (3,270,000 steps, 19.65 M scalar events)
    state_200mib  a run whose only file is a 200 MiB trainer_state.json (819,400 steps, 4.9 M points)

Then times `higgs-diag analyze RUN --format json` on each in a fresh process (wall seconds and the child's
peak RSS via os.wait4), prints a table (points read, wall s, s per million points, peak RSS MB, bytes of
peak RSS per point read), the targets (benchmarks/_targets.py) and draws docs/img/growth.png.

Targets: time linear in the points (s per million points at the largest size within 1.3x of 1x's); issue #10:
the whole analyze of the 1 GiB event file alone and of the 200 MiB state file alone each peak under 1 GB.

Usage: python benchmarks/bench_growth.py [--sizes 1,4,16] [--no-cases] [--regenerate] [--plot PATH] [--replot]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_analyze as ref  # noqa: E402  (the reference run's generator)
from _proc import measure  # noqa: E402  (the fresh-process measurement)
from _targets import target  # noqa: E402

DATA = ref.DATA / "growth"
PLOT = REPO / "docs" / "img" / "growth.png"
RESULTS = DATA / "results.json"  # the last run's rows (--replot draws from them)
EVENT_1GIB_STEPS = 3_270_000  # an event file of 1.0010 GiB
STATE_200MIB_STEPS = 819_400  # a trainer_state.json of about 200 MiB
LINEAR_SLACK = 1.3  # s per million points at the largest size / at 1x
CASE_RSS_GOAL_MB = 1000.0  # issue #10: under 1 GB (10^9 bytes) each


def _cases(sizes: list[int], cases: bool) -> list[dict]:
    out = [{"name": f"{k}x", "dir": ref.RUN if k == 1 else DATA / f"x{k}", "steps": ref.MAX_STEPS * k, "state": True,
            "events": True, "scale": k} for k in sizes]  # 1x is bench_analyze's reference run itself
    if cases:
        out.append({"name": "1 GiB event file alone", "dir": DATA / "event_1gib", "steps": EVENT_1GIB_STEPS,
                    "state": False, "events": True, "scale": None})
        out.append({"name": "200 MiB state file alone", "dir": DATA / "state_200mib", "steps": STATE_200MIB_STEPS,
                    "state": True, "events": False, "scale": None})
    return out


def _generate(case: dict, force: bool) -> dict:
    """Generate one run in a child process (its peak memory stays out of this one); its meta."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--generate-one", str(case["dir"]), str(case["steps"]),
            str(int(case["state"])), str(int(case["events"]))] + (["--regenerate"] if force else [])
    subprocess.run(argv, check=True)
    return json.loads((case["dir"].parent / (case["dir"].name + ".meta.json")).read_text())


def _analyze(run_dir: Path) -> dict:
    cli = Path(sys.executable).parent / "higgs-diag"
    m = measure([str(cli), "analyze", str(run_dir), "--format", "json"])
    report = ref._last_json(m["stdout"]) if m["stdout"].strip() else {}
    m["points"] = ref._analyze_points(report)
    summ = report.get("summary", {}) if isinstance(report, dict) else {}
    m["problems"] = summ.get("problems") or []
    if m["rc"] not in (0, 1):
        print(f"{run_dir}: exit code {m['rc']}: {m['stderr'][-1500:]}", file=sys.stderr)
    return m


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    grow = [r for r in rows if r["scale"] and isinstance(r["points"], int)]
    other = [r for r in rows if not r["scale"] and isinstance(r["points"], int)]
    for ax, key, label in ((ax1, "wall", "wall s (fresh process)"), (ax2, "rss_mb", "peak RSS MiB")):
        if grow:
            x = [r["points"] / 1e6 for r in grow]
            ax.plot(x, [r[key] for r in grow], "o-", label="reference run 1x, 4x, 16x")
            for r, xi in zip(grow, x):
                note = "" if r["points"] == r["written"] else f" (read {r['points'] / r['written']:.0%} of the points)"
                ax.annotate(r["name"] + note, (xi, r[key]), textcoords="offset points", xytext=(4, -10), fontsize=8)
            if key == "wall":
                per = grow[0]["wall"] / x[0]
                ax.plot([0, max(x)], [0, per * max(x)], ":", color="grey", label="linear from 1x")
        for r, mk in zip(other, "s^"):
            ax.plot([r["points"] / 1e6], [r[key]], mk, label=r["name"])
        if key == "rss_mb":
            ax.axhline(CASE_RSS_GOAL_MB * 1e6 / 2 ** 20, color="red", lw=0.8, ls="--",
                       label="1 GB = 10^9 bytes (issue #10 cases)")
        ax.set_xlabel("scalar points read (millions)")
        ax.set_ylabel(label)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("higgs-diag analyze: growth with the run (2-core machine)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16", help="lengths of the reference run to time, as multiples")
    ap.add_argument("--no-cases", action="store_true", help="skip issue #10's 1 GiB event / 200 MiB state runs")
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--plot", default=str(PLOT))
    ap.add_argument("--replot", action="store_true", help="draw the plot from the last run's results, run nothing")
    ap.add_argument("--generate-one", nargs=4, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.generate_one:
        d, steps, state, events = opts.generate_one
        ref.generate_run(Path(d), int(steps), state=state == "1", events=events == "1", force=opts.regenerate)
        return 0
    if opts.replot:
        _plot(json.loads(RESULTS.read_text()), Path(opts.plot))
        return 0
    sizes = sorted({int(s) for s in opts.sizes.split(",") if s.strip()})
    DATA.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in _cases(sizes, not opts.no_cases):
        meta = _generate(case, opts.regenerate)
        written = int(meta["points"]) + int(meta["state_points"])
        mb = (meta["state_bytes"] + meta["event_bytes"]) / 1e6
        print(f"{case['name']}: {case['steps']:,} steps, {meta['state_bytes'] / 1e6:.1f} MB state + "
              f"{meta['event_bytes'] / 1e6:.1f} MB events, {written:,} points written; analyzing ...",
              file=sys.stderr, flush=True)
        m = _analyze(case["dir"])
        rows.append({**case, **m, "written": written, "mb": mb})

    head = (f"{'run':26} {'files MB':>9} {'points written':>15} {'points read':>12} {'wall s':>7} {'cpu s':>6} {'s/Mpoint':>9} "
            f"{'peak RSS MB':>11} {'B RSS/point':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        pts = r["points"]
        if isinstance(pts, int) and pts:
            r["s_per_m"] = r["wall"] / (pts / 1e6)
            r["b_per_pt"] = r["rss_mb"] * 1024 * 1024 / pts
            tail = f"{pts:>12,} {r['wall']:7.2f} {r['cpu']:6.2f} {r['s_per_m']:9.3f} {r['rss_mb']:11.0f} {r['b_per_pt']:11.0f}"
        else:
            tail = f"{'?':>12} {r['wall']:7.2f} {r['cpu']:6.2f} {'-':>9} {r['rss_mb']:11.0f} {'-':>11}"
        print(f"{r['name']:26} {r['mb']:9.1f} {r['written']:>15,} {tail}")
        for p in r["problems"][:3]:
            print(f"{'':26}   read problem: {str(p)[:160]}")
    print("\nwall: the whole `higgs-diag analyze --format json` process (start-up and imports included); cpu: its user "
          "+ system seconds; s/Mpoint: wall per million points read; peak RSS of that process (os.wait4); MB = 2^20 bytes.")

    grow = [r for r in rows if r["scale"] and isinstance(r.get("s_per_m"), float)]
    if len(grow) >= 2 and grow[0]["scale"] == 1:
        big = grow[-1]
        ratio = big["s_per_m"] / grow[0]["s_per_m"]
        complete = big["points"] == big["written"]
        target(f"growth: s per Mpoint, {big['name']} / 1x", f"{ratio:.2f}x", f"<= {LINEAR_SLACK}x",
               ratio <= LINEAR_SLACK and complete,
               f"{grow[0]['s_per_m']:.3f} -> {big['s_per_m']:.3f} s/Mpoint; CPU s/Mpoint "
               f"{(big['cpu'] / big['points']) / (grow[0]['cpu'] / grow[0]['points']):.2f}x"
               + ("" if complete else f"; only {big['points']:,} of {big['written']:,} points read"))
    else:
        failed = [r["name"] for r in rows if r["scale"] and not isinstance(r.get("s_per_m"), float)]
        why = f"analyze failed on {', '.join(failed)}" if failed else "needs --sizes with 1 and another size"
        target("growth: s per Mpoint, largest / 1x", "-", f"<= {LINEAR_SLACK}x", None, why)
    for r in rows:
        if r["scale"]:
            continue
        ok = r["rc"] in (0, 1) and isinstance(r["points"], int) and r["points"] == r["written"]
        target(f"#10: {r['name']}, analyze peak RSS", f"{r['rss_mb'] * 1.048576:.0f} MB",
               f"< {CASE_RSS_GOAL_MB:.0f} MB", ok and r["rss_mb"] * 1.048576 < CASE_RSS_GOAL_MB,
               f"{r['written']:,} points, {r['wall']:.1f} s" + ("" if ok else f"; exit {r['rc']}, "
                                                                f"points read {r['points']}"))
    RESULTS.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("stdout", "stderr")} for r in rows],
                                  default=str))
    if opts.plot and rows:
        _plot(rows, Path(opts.plot))
        print(f"plot: {opts.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
