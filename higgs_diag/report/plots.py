"""PNG plots of a run's curves with the findings marked on them.

matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` objects directly (never pyplot), so a
user's backend and global state are untouched, and it is imported lazily so text/JSON reports start
fast. Long curves are decimated for drawing only (min/max per pixel column: a single spike stays
visible); the run's data are never modified.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from ..diagnosis import Diagnosis, Finding, Severity
from ._common import atomic_write

PLOT_NAMES = ("loss", "grad_norm", "learning_rate", "eval")
COLUMNS = 2000  # drawing resolution: about two buckets per pixel column of a 10-inch, 100-dpi figure
SEVERITY_COLORS = {Severity.CRITICAL: "#d62728", Severity.WARNING: "#ff7f0e", Severity.INFO: "#1f77b4"}
_CODEBOOK = re.compile(r"^audio_loss_cb(\d+)$")
_EVAL_EXCLUDED = ("_runtime", "_samples_per_second", "_steps_per_second", "_epoch")


def decimate(steps, values, columns: int = COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """Points to DRAW for a curve: at most two per column (the min and the max of the column, in step
    order), plus the first and last point, so spikes survive. Inputs are not modified; ±Inf become
    NaN (a gap). Short curves come back whole; in long ones non-finite points are dropped (the plots
    mark them separately)."""
    x = np.asarray(steps, dtype="float64")
    y = np.asarray(values, dtype="float64")
    if x.size and np.any(x[1:] < x[:-1]):
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
    y = np.where(np.isinf(y), np.nan, y)  # a new array: the caller's data stay as they are
    if x.size <= 2 * columns:
        return x.copy(), y
    ok = np.isfinite(y) & np.isfinite(x)
    x, y = x[ok], y[ok]
    if x.size <= 2 * columns:
        return x, y
    span = x[-1] - x[0]
    if span > 0:
        bucket = ((x - x[0]) / span * (columns - 1)).astype("int64")
    else:
        bucket = np.zeros(x.size, dtype="int64")
    order = np.lexsort((y, bucket))  # by bucket, then value: first of a bucket is its min, last its max
    b = bucket[order]
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    ends = np.r_[starts[1:], b.size] - 1
    keep = np.unique(np.concatenate([order[starts], order[ends], [0, x.size - 1]]))
    return x[keep], y[keep]


def _label(text: str) -> str:
    """A legend/label string from user data: no mathtext, not hidden by a leading underscore."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _plot_specs(run) -> list[tuple[str, str, list[tuple[str, dict]]]]:
    """(name, title, [(metric, line style)]) for every plot; metrics without data are skipped later."""
    metrics = set(run.metrics)
    cbs = sorted((m for m in metrics if _CODEBOOK.match(m)), key=lambda m: int(_CODEBOOK.match(m).group(1)))
    loss = [("loss", {"color": "#000000", "lw": 1.2}), ("text_loss", {"color": "#2ca02c", "lw": 1.0}),
            ("audio_loss", {"color": "#9467bd", "lw": 1.0})]
    for i, m in enumerate(cbs):
        shade = 0.15 + 0.7 * i / max(len(cbs) - 1, 1)
        loss.append((m, {"color": (0.1, shade, 0.9 - 0.5 * shade), "lw": 0.6, "alpha": 0.7}))
    loss.append(("eval_loss", {"color": "#d62728", "marker": "o", "ms": 4, "ls": "--", "lw": 0.8}))
    evals = sorted(m for m in metrics if m.startswith("eval_") and not m.endswith(_EVAL_EXCLUDED))
    eval_style = {"marker": "o", "ms": 3, "lw": 0.9}
    return [
        ("loss", "Loss", loss),
        ("grad_norm", "Gradient norm", [("grad_norm", {"color": "#1f77b4", "lw": 0.8})]),
        ("learning_rate", "Learning rate", [("learning_rate", {"color": "#8c564b", "lw": 1.0})]),
        ("eval", "Evaluation metrics", [(m, dict(eval_style)) for m in evals]),
    ]


def _mark_findings(ax, findings: list[Finding], drawn: set[str]) -> None:
    for i, f in enumerate(x for x in findings if x.steps):
        if f.metrics and not (set(f.metrics) & drawn):
            continue
        a, b = f.steps
        color = SEVERITY_COLORS.get(f.severity, "#7f7f7f")
        if a == b:
            ax.axvline(a, color=color, lw=1.2, ls="--", alpha=0.8, zorder=0.5)
        else:
            ax.axvspan(a, b, color=color, alpha=0.12, lw=0, zorder=0.5)
        ax.text(a, 0.97 - 0.07 * (i % 6), _label(f.code), transform=ax.get_xaxis_transform(),
                color=color, fontsize=8, va="top", ha="left",
                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})


def _draw_plot(run, diag: Diagnosis, title: str, lines: list[tuple[str, dict]], log_scale: bool):
    """One figure, or None when none of its metrics has data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn: set[str] = set()
    bad_steps: list[np.ndarray] = []
    finite_values: list[np.ndarray] = []
    for metric, style in lines:
        s = run.series(metric)
        if s.empty:
            continue
        x = s.index.to_numpy(dtype="float64")
        y = s.to_numpy(dtype="float64")
        dx, dy = decimate(x, y)
        style = dict(style)
        if dx.size <= 30 and "marker" not in style:
            style.update(marker="o", ms=3)
        ax.plot(dx, dy, label=_label(metric), **style)
        drawn.add(metric)
        finite = np.isfinite(y)
        bad_steps.append(x[~finite])
        finite_values.append(y[finite])
    if not drawn:
        return None

    bad = np.unique(np.concatenate(bad_steps)) if bad_steps else np.array([])
    if bad.size:
        # one tick per drawing column is enough to see where the non-finite steps are
        shown = bad if bad.size <= 2 * COLUMNS else decimate(bad, np.zeros(bad.size))[0]
        ax.plot(shown, np.zeros(shown.size), transform=ax.get_xaxis_transform(), ls="none",
                marker="|", ms=12, mew=1.5, color="#d62728", label=f"NaN/Inf ({bad.size} steps)")

    values = np.concatenate(finite_values) if finite_values else np.array([])
    if log_scale and values.size:
        positive = values[values > 0]
        if positive.size == values.size:
            ax.set_yscale("log")
        elif positive.size:
            ax.set_yscale("symlog", linthresh=float(positive.min()))

    _mark_findings(ax, diag.findings, drawn)
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def make_plots(diag: Diagnosis, out_dir: Path) -> dict[str, Path]:
    """Write ``loss.png``, ``grad_norm.png``, ``learning_rate.png`` and ``eval.png`` (only those with
    data) into ``out_dir``, atomically; returns ``{name: path}`` with names from :data:`PLOT_NAMES`."""
    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    run = diag.run
    if run is None:
        return out
    for name, title, lines in _plot_specs(run):
        fig = _draw_plot(run, diag, title, lines, log_scale=(name == "grad_norm"))
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out[name] = atomic_write(out_dir / f"{name}.png", buf.getvalue())
    return out
