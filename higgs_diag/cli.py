"""`higgs-diag`: a thin click shell over the library (parse options, call, render, exit code)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .config import Thresholds
from .diagnosis import Severity

FAIL_ON = ("info", "warning", "critical", "never")


def _thresholds(config_file: str | None, sets: tuple[str, ...]) -> Thresholds:
    try:
        t = Thresholds.from_file(config_file) if config_file else Thresholds()
        items = {}
        for item in sets:
            if "=" not in item:
                raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            items[k] = v
        return t.with_overrides(items)
    except (OSError, ValueError) as e:
        raise click.UsageError(str(e)) from None


def _exit_code(diag, fail_on: str) -> int:
    if fail_on == "never":
        return 0
    return 1 if diag.at_or_above(Severity.parse(fail_on)) else 0


PROGRESS_MIN_BYTES = 32 * 1024 * 1024  # below this a run reads in about a second: no bar


def _load_with_progress(run_dir, logs):
    from .run.discover import discover
    from .run.load import load_run, total_bytes

    files = discover(run_dir, logs)
    total = total_bytes(files)
    if not (sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES):
        return load_run(run_dir, files=files)
    with click.progressbar(length=total, label="reading run", file=sys.stderr) as bar:
        return load_run(run_dir, files=files, progress=bar.update)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="higgs-diag")
def main() -> None:
    """Find the root cause of a failed or suspicious Higgs Audio v2 fine-tuning run."""


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json", "html"]), default="text",
              show_default=True, help="What to print on stdout.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write report.json, report.md, report.html and plots/*.png into this folder.")
@click.option("--log", "logs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A console log of the run (repeatable); *.log files in RUN_DIR are read anyway.")
@click.option("--fail-on", type=click.Choice(FAIL_ON), default="warning", show_default=True,
              help="Exit 1 when a finding is at or above this severity.")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
              help="Override a threshold, e.g. --set audio_loss_warning=0.02 (see `higgs-diag checks`).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A JSON or TOML file of threshold overrides.")
@click.option("--color/--no-color", default=None, help="Colour the terminal report (default: on a TTY, "
                                                        "unless NO_COLOR is set).")
@click.option("--replay", is_flag=True, default=False,
              help="Also replay the run's saved batches (higgs-diag/batches/ or batches/) through its latest "
                   "loadable checkpoint and merge the findings (needs torch and boson_multimodal).")
@click.option("--batches", "batch_paths", multiple=True, type=click.Path(path_type=Path),
              help="Batch files or folders to replay instead of the run's own (repeatable; implies --replay).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="The checkpoint to replay through (default: the latest loadable one; implies --replay).")
@click.option("--base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Base model folder for a LoRA adapter checkpoint (default: its base_model_name_or_path).")
def analyze(run_dir: Path, fmt: str, output: Path | None, logs, fail_on: str, sets, config_file, color,
            replay: bool, batch_paths, checkpoint, base) -> None:
    """Read RUN_DIR (an output_dir, a checkpoint, a logging folder or a trainer_state.json), run every check
    and print a root-cause report."""
    from .api import diagnose
    from .run.discover import RunReadError

    thresholds = _thresholds(config_file, sets)
    try:
        run = _load_with_progress(run_dir, list(logs))
    except RunReadError as e:
        click.echo(f"higgs-diag: error: {e}", err=True)
        sys.exit(2)
    diag = diagnose(run, thresholds)
    if replay or batch_paths or checkpoint is not None:
        from .replay.api import merge, replay_run_evidence
        from .replay.errors import ReplayError

        try:
            ev = replay_run_evidence(run_dir, run, batches=list(batch_paths), checkpoint=checkpoint, base=base,
                                     thresholds=thresholds, progress=_progress())
        except ReplayError as e:
            # the log findings stand on their own: report them, and say why the replay did not run
            diag.summary["replay"] = {"error": str(e)}
            _emit(diag, run, fmt, output, color)
            click.echo(f"higgs-diag: {'error' if batch_paths or checkpoint else 'warning'}: replay skipped: {e}",
                       err=True)
            sys.exit(2 if batch_paths or checkpoint is not None else _exit_code(diag, fail_on))
        diag = merge(diag, ev, thresholds)
    _emit(diag, run, fmt, output, color)
    sys.exit(_exit_code(diag, fail_on))


def _progress():
    """A per-batch progress line on stderr when it is a terminal (replay of many batches)."""
    if not sys.stderr.isatty():
        return None

    def tick(i: int, n: int, path: str) -> None:
        if n >= 5:
            click.echo(f"\rreplaying batch {i}/{n}", err=True, nl=i == n)

    return tick


def _emit(diag, run, fmt: str, output: Path | None, color) -> None:
    from .report import render, write_reports

    if output is not None:
        try:
            paths = write_reports(diag, run, output)
        except OSError as e:
            click.echo(f"higgs-diag: error: cannot write the report to {output}: {e.strerror or e}", err=True)
            sys.exit(2)
        names = sorted({k.split("/")[0] + ("/" if "/" in k else "") for k in paths})
        click.echo(f"higgs-diag: report written to {output}/ ({', '.join(names)})", err=True)
    if fmt == "text":
        from .report.text import render_text, should_color

        use_color = should_color(sys.stdout) if color is None else color
        click.echo(render_text(diag, run, color=use_color), nl=False)
    else:
        click.echo(render(diag, run, fmt), nl=False)


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
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Model dtype (auto: float32 on CPU, the checkpoint's dtype on GPU).")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json", "html"]), default="text",
              show_default=True, help="What to print on stdout.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write report.json, report.md and report.html into this folder.")
@click.option("--fail-on", type=click.Choice(FAIL_ON), default="warning", show_default=True,
              help="Exit 1 when a finding is at or above this severity.")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Override a threshold (replay_*: see "
                                                                         "`higgs-diag checks`).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A JSON or TOML file of threshold overrides.")
@click.option("--color/--no-color", default=None, help="Colour the terminal report.")
def replay_batch(paths, run_dir, base, lora_alpha, no_model, device, dtype, fmt, output, fail_on, sets,
                 config_file, color) -> None:
    """Rerun saved batches (.pt dicts of tensors, .safetensors, the trainer's dumps, or folders of them) through
    CHECKPOINT and name the cause: unshifted loss, labels equal to inputs, audio inputs missing, labels masked,
    eval_loss not produced. Runs under torchrun too (batch files split across ranks)."""
    from .replay.api import dist_info, replay, split_paths
    from .replay.errors import ReplayError

    thresholds = _thresholds(config_file, sets)
    try:
        checkpoint, batches = split_paths(list(paths), no_model)
        diag = replay(checkpoint, batches, run=run_dir, base=base, lora_alpha=lora_alpha, no_model=no_model,
                      device=device, dtype=dtype, thresholds=thresholds, progress=_progress())
    except ReplayError as e:
        click.echo(f"higgs-diag: error: {e}", err=True)
        sys.exit(2)
    if dist_info()[0] == 0:  # under torchrun every rank builds the report; rank 0 prints it
        _emit(diag, None, fmt, output, color)
    sys.exit(_exit_code(diag, fail_on))


@main.command("checks")
def list_checks() -> None:
    """List the checks: code, category, scope and what each detects."""
    from .checks import all_codes

    for code, (c, category) in all_codes().items():
        click.echo(f"{code}  {category:<22} {c.scope:<8} {c.summary}")
    click.echo("\nThresholds (override with --set NAME=VALUE):")
    for name in Thresholds.names():
        click.echo(f"  {name} = {getattr(Thresholds(), name)!r}")


@main.command()
@click.argument("code")
def explain(code: str) -> None:
    """Print the documentation of one check, e.g. `higgs-diag explain HD101`."""
    from .checks import all_codes

    codes = all_codes()
    entry = codes.get(code.upper())
    if entry is None:
        raise click.UsageError(f"unknown check code {code!r}; `higgs-diag checks` lists them")
    c, category = entry
    click.echo(f"{code.upper()} {category} ({c.scope})\n")
    click.echo(c.doc)


if __name__ == "__main__":  # pragma: no cover
    main()
