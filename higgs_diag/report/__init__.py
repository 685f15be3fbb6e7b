"""The renderer family: one Diagnosis rendered as text, Markdown, JSON or a self-contained HTML page with
plots. Everything a renderer shows travels in the Diagnosis: its findings, its ``summary`` (what was read)
and, for the plots, the Run it came from (``diag.run``). No torch, no transformers here.

``write_reports`` writes every format into an output folder atomically; ``render`` returns one format
as a string (for stdout).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..diagnosis import Diagnosis
from ._common import atomic_write
from .html import render_html
from .json_report import render_json
from .markdown import render_markdown
from .text import render_text, should_color

# plots (numpy, and matplotlib when drawing) are imported when a plot is made, not with the package: the CLI
# imports report helpers for every command (`higgs-diag --help`, `explain`, `checks` need no numpy)
_LAZY = {"PLOT_NAMES", "decimate", "make_plots"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import plots
        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["render", "write_reports", "render_text", "render_markdown", "render_json", "render_html",
           "make_plots", "decimate", "should_color", "FORMATS"]

FORMATS = ("text", "markdown", "json", "html")
_ALIASES = {"md": "markdown", "txt": "text"}


def write_reports(diag: Diagnosis, out_dir: Path | str) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``plots/*.png`` (when the diagnosis has a run)
    into ``out_dir`` (created if missing). Each file is written atomically (temp file in the same
    folder, then ``os.replace``); plots of an earlier report that this run has no data for are
    removed. Returns ``{relative name: path}``, e.g. ``{"report.json": ..., "plots/loss.png": ...}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plots: dict[str, Path] = {}
    if diag.run is not None:
        from .plots import PLOT_NAMES, make_plots
        plot_dir = out_dir / "plots"
        plots = make_plots(diag, plot_dir)
        for name in PLOT_NAMES:  # a stale plot from a previous report would contradict this one
            stale = plot_dir / f"{name}.png"
            if name not in plots and stale.exists():
                stale.unlink()
        for name, path in plots.items():
            written[f"plots/{path.name}"] = path
    rel_plots = {name: f"plots/{path.name}" for name, path in plots.items()}
    written["report.json"] = atomic_write(out_dir / "report.json", render_json(diag))
    written["report.md"] = atomic_write(out_dir / "report.md", render_markdown(diag, rel_plots))
    written["report.html"] = atomic_write(out_dir / "report.html", render_html(diag, plots))
    return written


def render(diag: Diagnosis, fmt: str = "text", color: bool = False) -> str:
    """One format as a string: ``text`` (``color`` for ANSI), ``markdown``, ``json`` or ``html`` (plots
    made in a temporary folder and inlined)."""
    fmt = _ALIASES.get(fmt, fmt)
    if fmt == "text":
        return render_text(diag, color=color)
    if fmt == "markdown":
        return render_markdown(diag)
    if fmt == "json":
        return render_json(diag)
    if fmt == "html":
        if diag.run is None:
            return render_html(diag)
        with tempfile.TemporaryDirectory(prefix="higgs-diag-plots-") as tmp:
            from .plots import make_plots
            return render_html(diag, make_plots(diag, Path(tmp)))
    raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
