"""`higgs-diag`: a thin click shell over the library (parse options, call, render, exit code)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__
from .config import Selection, SelectionError, Thresholds, load_config_file
from .diagnosis import SCHEMA, Severity
from .formatting import clean
from .report._common import clean_name

FAIL_ON = ("info", "warning", "critical", "never")


def _settings(config_file: str | None, sets: tuple[str, ...], select: tuple[str, ...], ignore: tuple[str, ...]):
    """(Thresholds, Selection) from ``--config``, ``--set``, ``--select`` and ``--ignore``."""
    try:
        t, sel = load_config_file(config_file) if config_file else (Thresholds(), Selection())
        items = {}
        for item in sets:
            if "=" not in item:
                raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            items[k] = v
        return t.with_overrides(items), sel.merged(_entries(select), _entries(ignore))
    except (OSError, ValueError) as e:
        raise click.UsageError(str(e)) from None


def _entries(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(x.strip() for v in values for x in v.split(",") if x.strip())


def _exit_code(diag, fail_on: str) -> int:
    if fail_on == "never":
        return 0
    return 1 if diag.at_or_above(Severity.parse(fail_on)) else 0


PROGRESS_MIN_BYTES = 32 * 1024 * 1024  # below this a run reads in about a second: no bar


def _read_progress(total: int):
    """A percentage on stderr while a large run is read (only on a terminal)."""
    if not (sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES):
        return None
    done = [0]

    def tick(nbytes: int) -> None:
        done[0] += nbytes
        click.echo(f"\rreading run: {min(100, 100 * done[0] // total)}%", err=True, nl=done[0] >= total)

    return tick


def _rule_options(f):
    """--fail-on, --set, --config, --select, --ignore: shared by analyze and replay-batch."""
    f = click.option("--ignore", "ignore", multiple=True, metavar="CODES",
                     help="Rules not to run: codes, code prefixes (HD5) or categories, comma-separated or "
                          "repeated.")(f)
    f = click.option("--select", "select", multiple=True, metavar="CODES",
                     help="Only these rules: codes, code prefixes (HD2) or categories (audio-loss-collapse).")(f)
    f = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="A JSON or TOML file of threshold overrides and select/ignore lists.")(f)
    f = click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
                     help="Override a threshold, e.g. --set audio_loss_warning=0.02 (see `higgs-diag checks`).")(f)
    f = click.option("--fail-on", type=click.Choice(FAIL_ON), default="warning", show_default=True,
                     help="Exit 1 when a finding is at or above this severity.")(f)
    return f


INTERNAL_ERROR = 3  # a bug of ours, told apart from findings (1) and bad input (2)
TARGET_KEY = "higgs_diag.target"  # what a command works on, for the internal-error line (ctx.meta is shared)


class _Group(click.Group):
    """Turns an unexpected exception (a bug of ours) into one line and exit code 3; ``--debug`` (or
    HIGGS_DIAG_DEBUG=1) lets the traceback through."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit,
                KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the one place that catches everything, on purpose
            if ctx.params.get("debug") or os.environ.get("HIGGS_DIAG_DEBUG"):
                raise
            sub = ctx.invoked_subcommand or "higgs-diag"
            target = ctx.meta.get(TARGET_KEY, "")
            where = f" while running {sub}" + (f" on {clean_name(target)}" if target else "")
            msg = clean(" ".join(str(e).split()))[:300]
            click.echo(f"higgs-diag: internal error{where}: {type(e).__name__}: {msg}; run with --debug for the "
                       f"traceback (and please report it)", err=True)
            sys.exit(INTERNAL_ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="higgs-diag")
@click.option("--debug", is_flag=True, default=False, help="Show the traceback of an internal error (exit code 3).")
def main(debug: bool) -> None:
    """Find the root cause of a failed or suspicious Higgs Audio v2 fine-tuning run.

    Exit codes: 0 nothing at or above --fail-on, 1 findings at or above it, 2 usage error or nothing
    readable, 3 an internal error of higgs-diag (one line; --debug shows the traceback)."""


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN_DIR...")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json", "html"]), default="text",
              show_default=True, help="What to print on stdout (several runs: a triage table, or JSON lines).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
              help="Several runs: analyze this many in parallel processes (default: the cores this process may use).")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write report.json, report.md, report.html and plots/*.png into this folder.")
@click.option("--log", "logs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A console log of the run (repeatable); *.log files in RUN_DIR are read anyway.")
@_rule_options
@click.option("--color/--no-color", default=None, help="Colour the terminal report (default: on a TTY, "
                                                        "unless NO_COLOR is set).")
@click.option("--replay", is_flag=True, default=False,
              help="Also replay the run's saved batches (higgs-diag/batches/ or batches/) through its latest "
                   "loadable checkpoint (needs torch and boson_multimodal).")
@click.option("--batches", "batch_paths", multiple=True, type=click.Path(path_type=Path),
              help="Batch files or folders to replay instead of the run's own (repeatable; implies --replay).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The checkpoint to replay through (default: the latest loadable one; implies --replay).")
@click.option("--base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Base model folder for a LoRA adapter checkpoint (default: its base_model_name_or_path).")
@click.option("--all-checkpoints", is_flag=True, default=False,
              help="Replay every batch through every checkpoint of the run (default: the one nearest its step).")
@click.option("--batch-step", type=click.IntRange(min=0), default=None, metavar="N",
              help="The training step of batch files that do not say it (no dump meta, no step-N in the name).")
def analyze(run_dirs: tuple[Path, ...], fmt: str, jobs: int | None, output: Path | None, logs, fail_on: str, sets,
            config_file, select, ignore, color, replay: bool, batch_paths, checkpoint, base, all_checkpoints,
            batch_step) -> None:
    """Read RUN_DIR (an output_dir, a checkpoint, a logging folder or a trainer_state.json), run every rule
    and print a root-cause report. Several RUN_DIRs, or a folder of run folders (a sweep), give a triage
    table: one line per run, the worst first."""
    if not (replay or batch_paths or checkpoint is not None or all_checkpoints):
        _single_threaded_blas()
    from .api import analyze as analyze_run, find_runs
    from .run.discover import RunReadError

    click.get_current_context().meta[TARGET_KEY] = " ".join(str(r) for r in run_dirs[:2])
    thresholds, selection = _settings(config_file, sets, select, ignore)
    runs = [r for d in run_dirs for r in find_runs(d)]
    if len(runs) > 1:
        if replay or batch_paths or checkpoint is not None or all_checkpoints or logs:
            raise click.UsageError("--replay, --batches, --checkpoint and --log apply to one run; pass one RUN_DIR")
        _triage(runs, fmt, jobs, output, fail_on, thresholds, selection)
    run_dir = runs[0]
    try:
        diag = analyze_run(run_dir, replay=replay or all_checkpoints, batches=list(batch_paths), checkpoint=checkpoint,
                           base=base, all_checkpoints=all_checkpoints, batch_step=batch_step,
                           thresholds=thresholds, selection=selection, log_files=list(logs),
                           read_progress=_read_progress, replay_progress=_progress())
    except RunReadError as e:
        click.echo(f"higgs-diag: error: {e}", err=True)
        sys.exit(2)
    except SelectionError as e:
        raise click.UsageError(str(e)) from None
    _emit(diag, fmt, output, color)
    if diag.replay_error:
        named = bool(batch_paths) or checkpoint is not None
        click.echo(f"higgs-diag: {'error' if named else 'note'}: replay skipped: {diag.replay_error}", err=True)
        if named:  # the user named what to replay and it could not be used
            sys.exit(2)
    sys.exit(_exit_code(diag, fail_on))


def _single_threaded_blas() -> None:
    """Reading logs does no linear algebra worth a thread pool, and numpy's OpenBLAS starts one thread per core
    when numpy is imported; the extra thread spins about 0.06 s of CPU on a 2-core machine (measured: ``import
    numpy`` takes 0.13 s CPU, 0.07 s with one thread). So the log-only analyze asks for one BLAS thread before
    numpy is first imported, unless the user set OPENBLAS_NUM_THREADS. Not for --replay: torch may use
    OpenBLAS (aarch64 wheels) and needs its threads."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


TRIAGE_ORDER = {"critical": 0, "warning": 1, "healthy": 2}


# The triage table's verdict for a run with no report, by error_kind: a worker process that died (killed by the
# OOM killer, most likely; the error says the signal or exit code) is not reported as a bug of higgs-diag, though
# both exit 3.
UNANALYZED_VERDICT = {"unreadable": "error", "internal": "internal-error", "crashed": "worker-died"}


def _triage(runs: list[Path], fmt: str, jobs: int | None, output: Path | None, fail_on: str, thresholds,
            selection) -> None:
    """Many runs: one line each (verdict, top finding, steps, path), worst first; JSON lines with --format json
    (one report per run); reports under OUTPUT/<run name>/ with -o. Exits with the worst outcome."""
    from .api import analyze_many
    from .formatting import clean

    if fmt not in ("text", "json"):
        raise click.UsageError("several runs print a triage table (--format text) or JSON lines (--format json)")
    outs = [output / _safe_name(r, i) for i, r in enumerate(runs)] if output is not None else None
    results = list(analyze_many(runs, jobs=jobs, outputs=outs, thresholds=thresholds, selection=selection))
    codes = []
    rows = []
    for res in results:
        rep = res["report"]
        if rep is None:
            codes.append(2 if res["kind"] == "unreadable" else INTERNAL_ERROR)
            rows.append((3, UNANALYZED_VERDICT.get(res["kind"], "internal-error"), "-", res["error"], "-",
                         res["run_dir"]))
            continue
        worst = max((Severity.parse(f["severity"]) for f in rep["findings"]), default=Severity.INFO)
        codes.append(1 if fail_on != "never" and worst >= Severity.parse(fail_on) else 0)
        top = rep["findings"][0] if rep["findings"] else None
        rows.append((TRIAGE_ORDER.get(rep["verdict"], 3), rep["verdict"], top["code"] if top else "-",
                     top["title"] if top else "no findings", rep["summary"].get("steps", "-"), res["run_dir"]))
    if fmt == "json":
        for res in results:
            click.echo(_json_line(res["report"] or {"schema": SCHEMA, "target": res["run_dir"],
                                                    "error": res["error"], "error_kind": res["kind"]}))
    else:
        click.echo(f"{'verdict':<15} {'code':<6} {'steps':>8}  {'run':<40} top finding")
        for _, verdict, code, title, steps, path in sorted(rows, key=lambda r: r[0]):
            click.echo(f"{verdict:<15} {code:<6} {str(steps):>8}  {clean(path):<40} {clean(title)[:100]}")
        n = {v: sum(1 for r in rows if r[1] == v) for v in ("critical", "warning", "healthy")}
        click.echo(f"\n{len(rows)} runs: {n['critical']} critical, {n['warning']} warning, {n['healthy']} healthy, "
                   f"{len(rows) - sum(n.values())} not analyzed", err=True)
    sys.exit(max(codes, default=0))


def _safe_name(run: Path, i: int) -> str:
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run.name) or "run"
    return f"{i:03d}-{name}"


def _json_line(report: dict) -> str:
    """One run's report as one line of strict JSON (JSON lines: one report per run)."""
    import json

    from .report.json_report import jsonable

    return json.dumps(jsonable(report), allow_nan=False)


def _progress():
    """A per-batch progress line on stderr when it is a terminal (replay of many batches)."""
    if not sys.stderr.isatty():
        return None

    def tick(i: int, n: int, path: str) -> None:
        if n >= 5:
            click.echo(f"\rreplaying batch {i}/{n}", err=True, nl=i == n)

    return tick


def _emit(diag, fmt: str, output: Path | None, color) -> None:
    from .report import render, write_reports

    if output is not None:
        try:
            paths = write_reports(diag, output)
        except OSError as e:
            click.echo(f"higgs-diag: error: cannot write the report to {output}: {e.strerror or e}", err=True)
            sys.exit(2)
        names = sorted({k.split("/")[0] + ("/" if "/" in k else "") for k in paths})
        click.echo(f"higgs-diag: report written to {output}/ ({', '.join(names)})", err=True)
    if fmt == "text":
        from .report.text import should_color

        use_color = should_color(sys.stdout) if color is None else color
        click.echo(render(diag, "text", color=use_color), nl=False)
    else:
        click.echo(render(diag, fmt), nl=False)


@main.command("replay-batch")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="CHECKPOINT BATCH...")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The run's output_dir, for the logged losses, args and model_config (default: the checkpoint's "
                   "parent).")
@click.option("--base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Base model folder for a LoRA adapter (default: the adapter's base_model_name_or_path when it is "
                   "a local folder).")
@click.option("--lora-alpha", type=float, default=None,
              help="lora_alpha of a wrapper checkpoint with LoRA weights and no adapter_config.json near it.")
@click.option("--no-model", is_flag=True, default=False,
              help="Only the batch checks (no model, no boson_multimodal); CHECKPOINT is then optional.")
@click.option("--batch-step", type=click.IntRange(min=0), default=None, metavar="N",
              help="The training step of batch files that do not say it (no dump meta, no step-N in the name).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Model dtype (auto: the checkpoint's own, e.g. bfloat16 for the release, on "
                                      "CPU and GPU; float32 only when asked for).")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json", "html"]), default="text",
              show_default=True, help="What to print on stdout.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write report.json, report.md and report.html into this folder.")
@_rule_options
@click.option("--color/--no-color", default=None, help="Colour the terminal report.")
def replay_batch(paths, run_dir, base, lora_alpha, no_model, batch_step, device, dtype, fmt, output, fail_on, sets,
                 config_file, select, ignore, color) -> None:
    """Rerun saved batches (.pt dicts of tensors, .safetensors, the trainer's dumps, or folders of them) through
    CHECKPOINT and name the cause: unshifted loss, labels equal to inputs, audio inputs missing, labels masked,
    eval_loss not produced. Runs under torchrun too (batch files split across ranks)."""
    from .api import replay_batch as replay_batches
    from .config import ReplayOptions
    from .replay.api import dist_info, split_paths
    from .replay.errors import ReplayError

    click.get_current_context().meta[TARGET_KEY] = " ".join(str(p) for p in paths[:2])
    thresholds, selection = _settings(config_file, sets, select, ignore)
    options = ReplayOptions(base=base, lora_alpha=lora_alpha, device=device, dtype=dtype, no_model=no_model)
    try:
        checkpoint, batches = split_paths(list(paths), no_model)
        diag = replay_batches(checkpoint, batches, run_dir=run_dir, options=options, thresholds=thresholds,
                              selection=selection, batch_step=batch_step, progress=_progress())
    except ReplayError as e:
        click.echo(f"higgs-diag: error: {e}", err=True)
        sys.exit(2)
    except SelectionError as e:
        raise click.UsageError(str(e)) from None
    if dist_info()[0] == 0:  # under torchrun every rank builds the report; rank 0 prints it
        _emit(diag, fmt, output, color)
    sys.exit(_exit_code(diag, fail_on))


@main.command("checks")
def list_checks() -> None:
    """List the rules: code, category, scope, what each detects, and the thresholds it reads."""
    from .checks import load_all

    defaults = Thresholds()
    for code, c in load_all().items():
        click.echo(f"{code}  {c.category:<24} {c.scope:<8} {c.summary}")
        for name in c.thresholds:
            click.echo(f"{'':8}{name} = {getattr(defaults, name)!r}")
    click.echo("\nOverride a threshold with --set NAME=VALUE; select rules with --select/--ignore CODES.")


@main.command()
@click.argument("code")
def explain(code: str) -> None:
    """Print the documentation of one rule, e.g. `higgs-diag explain HD101`."""
    from .checks import load_all
    from .checks.docgen import rule_markdown

    c = load_all().get(code.strip().upper())
    if c is None:
        raise click.UsageError(f"unknown check code {code!r}; `higgs-diag checks` lists them")
    click.echo(f"{c.code} {c.category} ({c.scope})\n")
    click.echo(rule_markdown(c))


if __name__ == "__main__":  # pragma: no cover
    main()
