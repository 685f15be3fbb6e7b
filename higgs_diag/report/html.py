"""The self-contained HTML report: one file, inline CSS, plots inlined as data URIs, no scripts, no
external resources. Every string from the logs or the diagnosis goes through ``html.escape``."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from ..diagnosis import SCHEMA, Diagnosis
from ._common import clean, clean_name, counts, fmt_value, run_facts, safe_output, span_text

_CSS = """
body { font: 14px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 90%; }
.target { color: #57606a; word-break: break-all; }
.banner { padding: .8em 1.2em; border-radius: 6px; font-size: 1.2em; font-weight: 600; margin: 1em 0; }
.banner.critical { background: #ffebe9; border: 1px solid #d1242f; color: #82071e; }
.banner.warning { background: #fff8c5; border: 1px solid #bf8700; color: #6f4e00; }
.banner.healthy { background: #dafbe1; border: 1px solid #1a7f37; color: #0a5223; }
.banner small { font-weight: normal; font-size: .8em; margin-left: 1em; }
table { border-collapse: collapse; width: 100%; margin: .5em 0; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
.sev { display: inline-block; padding: 0 .5em; border-radius: 1em; font-size: .85em; font-weight: 600;
       color: #fff; }
.sev.critical { background: #d1242f; } .sev.warning { background: #bf8700; } .sev.info { background: #0969da; }
.finding { border: 1px solid #d0d7de; border-left-width: 5px; border-radius: 6px; padding: .2em 1em .8em;
           margin: 1em 0; }
.finding.critical { border-left-color: #d1242f; } .finding.warning { border-left-color: #bf8700; }
.finding.info { border-left-color: #0969da; }
.finding h3 { margin: .6em 0 .3em; font-size: 1.1em; }
.finding ul { margin: .2em 0; padding-left: 1.4em; }
.finding li { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 88%;
              white-space: pre-wrap; word-break: break-word; }
.label { font-weight: 600; }
.text { white-space: pre-wrap; }
.meta { color: #57606a; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: .9em; }
"""


def _e(value: Any) -> str:
    """User data as HTML text: control characters (from logs) shown as ``\\xNN``, then escaped."""
    return html.escape(clean(value), quote=True)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(diag: Diagnosis, plots: dict[str, Path] | None = None) -> str:
    """One self-contained HTML page. ``plots``: ``{name: path to a PNG}``, inlined as data URIs."""
    verdict = diag.verdict
    n = counts(diag)
    first_of_code: dict[str, int] = {}
    for i, f in enumerate(diag.findings, 1):
        first_of_code.setdefault(f.code, i)

    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>higgs-diag: {_e(verdict)} - {_e(clean_name(diag.target))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<h1>higgs-diag report</h1>",
        f'<div class="target mono">{_e(clean_name(diag.target))}</div>',
    ]
    tally = ", ".join(f"{k} {_e(str(s))}" for s, k in n.items())
    if verdict == "healthy":
        headline = "Healthy: no problems found"
    else:
        headline = f"{verdict.capitalize()}"
    out.append(f'<div class="banner {_e(verdict)}">{_e(headline)}<small>{tally}</small></div>')

    if diag.findings:
        out.append("<h2>Findings</h2>")
        out.append("<table><thead><tr><th>#</th><th>Severity</th><th>Code</th><th>Category</th>"
                   "<th>Title</th><th>Steps</th></tr></thead><tbody>")
        for i, f in enumerate(diag.findings, 1):
            sev = str(f.severity)
            out.append(
                f'<tr><td>{i}</td><td><span class="sev {_e(sev)}">{_e(sev)}</span></td>'
                f'<td><a href="#finding-{i}"><code>{_e(f.code)}</code></a></td><td><code>{_e(f.category)}</code></td>'
                f"<td>{_e(f.title)}</td><td>{_e(span_text(f.steps) or '')}</td></tr>"
            )
        out.append("</tbody></table>")

        for i, f in enumerate(diag.findings, 1):
            sev = str(f.severity)
            out.append(f'<section class="finding {_e(sev)}" id="finding-{i}">')
            out.append(f'<h3><span class="sev {_e(sev)}">{_e(sev)}</span> <code>{_e(f.code)}</code> '
                       f"<code>{_e(f.category)}</code>: {_e(f.title)}</h3>")
            if f.evidence:
                out.append("<ul>" + "".join(f"<li>{_e(ev)}</li>" for ev in f.evidence) + "</ul>")
            if f.explanation:
                out.append(f'<p class="text"><span class="label">Why:</span> {_e(f.explanation)}</p>')
            if f.fix:
                out.append(f'<p class="text"><span class="label">Fix:</span> {_e(f.fix)}</p>')
            meta = []
            span = span_text(f.steps)
            if span:
                meta.append(f'<span class="label">Steps:</span> {_e(span)}')
            if f.caused_by:
                target = first_of_code.get(f.caused_by)
                code = f"<code>{_e(f.caused_by)}</code>"
                meta.append('<span class="label">Caused by:</span> '
                            + (f'<a href="#finding-{target}">{code}</a>' if target else code))
            if meta:
                out.append('<p class="meta">' + " &middot; ".join(meta) + "</p>")
            out.append("</section>")

    if plots:
        out.append("<h2>Plots</h2>")
        for name, path in plots.items():
            out.append(f'<figure><img src="{_png_data_uri(path)}" alt="{_e(name)}">'
                       f"<figcaption>{_e(name)}</figcaption></figure>")

    facts = run_facts(diag)
    if facts is not None:
        out.append("<h2>Run</h2>")
        rows = [("Root", f"<code>{_e(facts['root'])}</code>")]
        if facts["steps"]:
            rows.append(("Steps", _e(f"{facts['steps'][0]}-{facts['steps'][1]}")))
        rows += [("Metrics read", _e(facts["metrics"])), ("Scalar points", _e(f"{facts['points']:,}")),
                 ("Checkpoints", _e(facts["checkpoints"]))]
        if facts["metric_names"]:
            rows.append(("Metrics", ", ".join(f"<code>{_e(m)}</code>" for m in facts["metric_names"])))
        out.append("<table><tbody>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
                   + "</tbody></table>")
        if facts["files_read"]:
            out.append("<h3>Files read</h3><ul>"
                       + "".join(f"<li><code>{_e(p)}</code></li>" for p in facts["files_read"]) + "</ul>")
        if facts["problems"]:
            out.append("<h3>Read problems</h3><ul>"
                       + "".join(f"<li><code>{_e(p)}</code></li>" for p in facts["problems"]) + "</ul>")

    if diag.summary:
        out.append("<h2>Summary</h2><table><tbody>")
        for k, v in diag.summary.items():
            out.append(f"<tr><th><code>{_e(k)}</code></th><td>{_e(fmt_value(v))}</td></tr>")
        out.append("</tbody></table>")

    out.append(f'<p class="meta">higgs-diag {_e(diag.tool_version)} &middot; schema {_e(SCHEMA)}</p>')
    out.append("</body>")
    out.append("</html>")
    return safe_output("\n".join(out) + "\n")
