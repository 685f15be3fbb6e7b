"""The renderer family: JSON contract, HTML escaping and self-containment, Markdown escaping, plots,
decimation, atomic writes, text colour."""
from __future__ import annotations

import json
import math
import re
import sys
import time

import numpy as np
import pandas as pd
import pytest

from higgs_diag.diagnosis import Diagnosis, Finding, Severity
from higgs_diag.api import summarize
from higgs_diag.report import decimate, make_plots, render, render_html, render_json, render_markdown, \
    render_text, should_color, write_reports
from higgs_diag.report.markdown import md_code, md_text
from higgs_diag.run.model import ReadProblem, Run

EVIL = "<script>alert(1)</script>"
LONG = 143_000


def _rows(metric, steps, values, source="trainer_state", file="trainer_state.json"):
    return pd.DataFrame({"step": np.asarray(steps, dtype="int64"), "metric": metric,
                         "value": np.asarray(values, dtype="float64"), "source": source,
                         "wall_time": np.nan, "file": file, "segment": 0})


def make_run(n: int = 2000) -> Run:
    steps = np.arange(1, n + 1)
    rng = np.random.default_rng(0)
    loss = 7.0 * np.exp(-steps / (n / 3)) + 0.5 + 0.05 * rng.standard_normal(n)
    grad = 0.4 + 0.05 * rng.standard_normal(n)
    grad[n // 2] = math.nan
    grad[n // 2 + 10] = math.inf
    frames = [
        _rows("loss", steps, loss),
        _rows("text_loss", steps, loss * 0.4),
        _rows("audio_loss", steps, loss * 0.6),
        _rows("grad_norm", steps, grad),
        _rows("learning_rate", steps, np.linspace(2e-5, 0, n)),
        _rows("eval_loss", steps[::200], loss[::200] + 0.1),
        _rows("eval_runtime", steps[::200], np.full(len(steps[::200]), 3.2)),
        _rows(EVIL, steps[:5], [1.0, 2.0, math.nan, 4.0, 5.0], source="tensorboard", file="events.out.tfevents.1.|host`"),
    ]
    for k in range(3):
        frames.append(_rows(f"audio_loss_cb{k}", steps, loss * 0.6 + 0.1 * k))
    run = Run(root="/runs/exp|1", scalars=pd.concat(frames, ignore_index=True))
    run.files_read = ["trainer_state.json", f"runs/{EVIL}/events.out.tfevents.1"]
    run.problems = [ReadProblem(file="events.out.tfevents.2", message=f"truncated record {EVIL}", offset=1234,
                                kind="truncated")]
    return run


def with_run(diag: Diagnosis, run: Run | None) -> Diagnosis:
    """The diagnosis as higgs_diag.api builds it: carrying its run and the summary of what was read."""
    if run is not None:
        diag.run = run
        diag.summary.update(summarize(run))
    return diag


def make_diag(target: str = f"/runs/exp|1 {EVIL}") -> Diagnosis:
    return Diagnosis(
        target=target,
        findings=[
            Finding("HD101", "eval-loss-missing", Severity.CRITICAL, f"eval_loss never logged {EVIL}",
                    evidence=["eval_runtime logged at 10 steps | no eval_loss", "tag `train/loss` ``x``", EVIL],
                    explanation="The Trainer drops eval_loss when label_names is not set.\n- not a list",
                    fix='Set label_names=["labels"] in TrainingArguments.', steps=(200, 2000),
                    metrics=("eval_loss",)),
            Finding("HD401", "grad-explosion", Severity.WARNING, "grad_norm NaN", evidence=["step 1000: NaN"],
                    steps=(1000, 1010), caused_by="HD101", metrics=("grad_norm",)),
            Finding("HD900", "lr-schedule", Severity.INFO, "warmup is 0 steps", evidence=["warmup_steps=0"],
                    steps=(1, 1)),
        ],
        summary={"last_step": 2000, "final_loss": math.nan, "max_grad": math.inf, "min": -math.inf,
                 "nested": {"x": [1.0, math.nan]}, "np": np.float64(1.5), "npi": np.int64(3)},
    )


# ---------------------------------------------------------------- JSON
def test_json_contract_and_no_bare_nan():
    text = render_json(make_diag())
    assert "NaN," not in text.replace('"NaN"', "") and "Infinity" not in text.replace('"Infinity"', "").replace('"-Infinity"', "")
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert data["schema"] == "higgs-diag.report/1"
    assert {"tool_version", "target", "verdict", "findings", "summary"} <= set(data)
    assert data["verdict"] in ("healthy", "warning", "critical") and data["verdict"] == "critical"
    keys = {"code", "category", "severity", "title", "evidence", "explanation", "fix", "steps", "caused_by"}
    for f in data["findings"]:
        assert keys <= set(f)
        assert f["severity"] in ("info", "warning", "critical")
    assert [f["code"] for f in data["findings"]] == ["HD101", "HD401", "HD900"]
    assert data["findings"][0]["steps"] == [200, 2000]
    assert data["findings"][1]["caused_by"] == "HD101"
    s = data["summary"]
    assert (s["final_loss"], s["max_grad"], s["min"]) == ("NaN", "Infinity", "-Infinity")
    assert s["nested"]["x"] == [1.0, "NaN"] and s["np"] == 1.5 and s["npi"] == 3


def test_json_healthy():
    data = json.loads(render_json(Diagnosis(target="x", findings=[])))
    assert data["verdict"] == "healthy" and data["findings"] == []


# ---------------------------------------------------------------- HTML
def _assert_safe_html(page: str) -> None:
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "@import" not in page and "url(" not in page


def test_html_escapes_user_data_and_is_self_contained(tmp_path):
    run, diag = make_run(), make_diag()
    diag = with_run(diag, run)
    plots = make_plots(diag, tmp_path)
    page = render_html(diag, plots)
    _assert_safe_html(page)
    assert page.count('src="data:image/png;base64,') == len(plots) >= 3
    assert "truncated record" in page  # read problems listed
    assert "trainer_state.json" in page  # files read listed
    assert 'href="#finding-1"' in page  # caused_by links to its cause


def test_html_via_render_inlines_plots():
    page = render(with_run(make_diag(), make_run()), "html")
    _assert_safe_html(page)
    assert 'src="data:image/png;base64,' in page


def test_html_without_run_and_healthy():
    page = render_html(Diagnosis(target=EVIL, findings=[]))
    _assert_safe_html(page)
    assert "no problems found" in page


# ---------------------------------------------------------------- Markdown
def test_markdown_escapes_structure():
    md = render_markdown(with_run(make_diag(), make_run()), {"loss": "plots/loss.png"})
    # raw HTML from the data appears only inside code spans (where it is literal text)
    assert "<script>" not in re.sub(r"(`+)(.+?)\1", "", md)
    assert "\\<script\\>" in md
    assert "![loss](plots/loss.png)" in md
    # every findings-table row has exactly the 7 unescaped pipes of its 6 cells
    table = [line for line in md.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(table) == 3
    for line in table:
        assert len(re.findall(r"(?<!\\)\|", line)) == 7, line
    assert "### 1. [CRITICAL] HD101 eval\\-loss\\-missing" in md or "### 1. [CRITICAL] HD101 eval-loss-missing" in md


def test_md_code_spans_survive_backticks_and_pipes():
    assert md_code("a`b") == "``a`b``"
    assert md_code("`x`") == "`` `x` ``"
    assert md_code("a|b", in_table=True) == "`a\\|b`"
    assert md_text("- item\n1. two") == "\\- item 1\\. two"
    assert md_text("a | b `c` <b>") == "a \\| b \\`c\\` \\<b\\>"


# ---------------------------------------------------------------- text
def test_text_report_plain():
    text = render_text(with_run(make_diag(), make_run()), color=False)
    assert "\x1b" not in text
    assert "[CRITICAL] HD101 eval-loss-missing: eval_loss never logged" in text
    assert "Why:" in text and "Fix:" in text and "Steps: 200-2000" in text and "Caused by: HD101" in text
    assert "Verdict: CRITICAL (1 critical, 1 warning, 1 info)" in text
    assert "steps 1-2000" in text
    assert all(len(line) <= 110 for line in text.splitlines() if line.startswith("  Why"))


def test_text_strips_control_characters_from_data():
    diag = Diagnosis(target="x", findings=[Finding("HD1", "non-finite", Severity.WARNING, "bad \x1b[31mred",
                                                   evidence=["a\rb"])])
    text = render_text(diag, color=False)
    assert "\x1b" not in text and "\r" not in text and "\\x1b[31mred" in text


def test_text_colour_and_healthy():
    diag = Diagnosis(target="run", findings=[Finding("HD900", "lr-schedule", Severity.INFO, "note")])
    plain = render_text(diag)
    assert "No problems found" in plain and "[INFO] HD900" in plain
    assert "\x1b[" in render_text(diag, color=True)


def test_should_color(monkeypatch):
    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    assert should_color(Tty()) is True
    assert should_color(object()) is False
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert should_color(object()) is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert should_color(Tty()) is False


# ---------------------------------------------------------------- plots and decimation
def test_decimate_keeps_a_single_spike():
    steps = np.arange(LONG)
    values = np.ones(LONG)
    values[98_765] = 1e6
    values[12_345] = -5.0
    before = values.copy()
    x, y = decimate(steps, values)
    assert np.array_equal(values, before)  # input untouched
    assert len(x) <= 2 * 2000 + 2
    assert y.max() == values.max() and y.min() == values.min()
    assert x[np.argmax(y)] == 98_765
    assert np.all(np.diff(x) > 0)
    sx, sy = decimate(steps[:100], values[:100])  # short curves come back whole
    assert len(sx) == 100


def test_decimate_non_finite():
    x, y = decimate([1, 2, 3], [1.0, math.inf, math.nan])
    assert len(x) == 3 and math.isnan(y[1])


def test_plots_exist_and_are_fast(tmp_path):
    n = LONG
    steps = np.arange(1, n + 1)
    grad = np.full(n, 0.3)
    grad[70_000] = 500.0
    grad[100_000:100_005] = math.nan
    df = pd.concat([_rows("grad_norm", steps, grad), _rows("loss", steps, np.linspace(7, 1, n))], ignore_index=True)
    run = Run(root="r", scalars=df)
    before = run.scalars.copy()
    diag = Diagnosis(target="r", findings=[Finding("HD401", "grad-explosion", Severity.WARNING, "spike",
                                                   steps=(70_000, 70_000), metrics=("grad_norm",))])
    diag.run = run
    t0 = time.perf_counter()
    plots = make_plots(diag, tmp_path)
    elapsed = time.perf_counter() - t0
    assert set(plots) == {"grad_norm", "loss"}
    for p in plots.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert elapsed < 2 * 2.0  # two plots, generous for slow CI; well under a second each locally
    pd.testing.assert_frame_equal(run.scalars, before)


def test_make_plots_does_not_touch_pyplot_backend(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    make_plots(with_run(make_diag(), make_run(200)), tmp_path)
    assert matplotlib.get_backend() == backend


# ---------------------------------------------------------------- write_reports
def test_write_reports_atomic(tmp_path):
    out = tmp_path / "new" / "report"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "eval.png").write_bytes(b"stale")  # a plot from an older report
    run = make_run()
    run.scalars = run.scalars[run.scalars["metric"] != "eval_loss"]
    run.scalars = run.scalars[run.scalars["metric"] != "eval_runtime"]
    paths = write_reports(with_run(make_diag(), run), out)
    assert {"report.json", "report.md", "report.html"} <= set(paths)
    assert {"plots/loss.png", "plots/grad_norm.png", "plots/learning_rate.png"} <= set(paths)
    assert not (out / "plots" / "eval.png").exists()
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    json.loads((out / "report.json").read_text())
    assert "](plots/loss.png)" in (out / "report.md").read_text()
    _assert_safe_html((out / "report.html").read_text())


def test_write_reports_without_run(tmp_path):
    paths = write_reports(make_diag(), tmp_path / "r")
    assert set(paths) == {"report.json", "report.md", "report.html"}


def test_render_formats():
    diag = with_run(make_diag(), make_run(300))
    for fmt in ("text", "markdown", "md", "json", "html"):
        assert render(diag, fmt)
    with pytest.raises(ValueError):
        render(diag, "pdf")


def test_report_package_does_not_import_torch():
    import subprocess

    code = ("import sys, higgs_diag.report as r; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
