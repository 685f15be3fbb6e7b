"""The library face of higgs-diag: the CLI is a thin shell over these functions.

    import higgs_diag
    diag = higgs_diag.analyze("output/")                      # the logs alone
    diag = higgs_diag.analyze("output/", replay=True)          # + its batch dumps through its latest checkpoint
    diag = higgs_diag.replay_batch("output/checkpoint-500", ["output/higgs-diag/batches/step-000500.pt"])

One direction: ``run/`` reads a Run, ``replay/`` measures a ReplayEvidence, the rules in ``checks/`` judge
both, ``diagnosis`` ranks, ``report/`` renders the Diagnosis (which carries what was read).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from .config import ReplayOptions, Selection, Thresholds
from .diagnosis import Diagnosis
from .evidence import ReplayEvidence
from .procs import single_threaded, usable_cores
from .run.read_worker import READ_WORKER_ENV
from .run.model import Run

Progress = Callable[[int, int, str], None]


def load_run(run_dir: str | os.PathLike, *, log_files=None,
             read_progress: Callable[[int], Callable[[int], None] | None] | None = None) -> Run:
    """Read a run directory (an output_dir, one checkpoint, a logging folder, one trainer_state.json).
    ``read_progress(total_bytes)`` may return a callback that is given the bytes read after each file.
    Raises ``RunReadError`` when nothing could be read."""
    from .run.discover import discover
    from .run.load import load_run as _load, total_bytes

    files = discover(run_dir, list(log_files or []))
    tick = read_progress(total_bytes(files)) if read_progress is not None else None
    return _load(run_dir, files=files, progress=tick)


def summarize(run: Run) -> dict:
    """The ``summary`` block of the report: what was read (computed once; every renderer shows it)."""
    st = run.state
    first = int(run.scalars["step"].min()) if not run.scalars.empty else None
    return {
        "steps": run.last_step,
        "first_step": first,
        "n_points": run.n_points,
        "metrics": run.metrics,
        "files_read": [str(f) for f in run.files_read],
        "not_read": list(run.other_files),
        "trainer_state": st.path if st else None,
        "max_steps": st.max_steps if st else run.arg("max_steps"),
        "best_metric": st.best_metric if st and isinstance(st.best_metric, (int, float)) else None,
        "best_model_checkpoint": st.best_model_checkpoint if st else None,
        "checkpoints": [c.path for c in run.checkpoints],
        "args_from": run.args_file,
        "model_config_from": run.model_config_file,
        "problems": [str(p) for p in run.problems],
    }


def _selection(select: Iterable[str] | None, ignore: Iterable[str] | None,
               selection: Selection | None) -> Selection:
    from .checks import load_all

    sel = (selection or Selection()).merged(select or (), ignore or ())
    rules = load_all()
    sel.validate(rules, {c.category for c in rules.values()})
    return sel


def diagnose(run: Run | None, *, thresholds: Thresholds | None = None, selection: Selection | None = None,
             evidence: ReplayEvidence | None = None, target: str | None = None) -> Diagnosis:
    """Judge a Run and/or a ReplayEvidence with the selected rules: one ranked Diagnosis."""
    from .checks import run_checks

    findings = run_checks(run, thresholds or Thresholds(), selection, replay_evidence=evidence)
    summary = summarize(run) if run is not None else {}
    if evidence is not None:
        summary["replay"] = evidence.summary()
    name = target if target is not None else (run.root if run is not None else "")
    return Diagnosis(target=str(name), findings=findings, summary=summary, run=run)


def analyze(run_dir: str | os.PathLike, *, replay: bool = False, batches: Iterable[str | os.PathLike] | None = None,
            checkpoint: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
            thresholds: Thresholds | None = None, select: Iterable[str] | None = None,
            ignore: Iterable[str] | None = None, selection: Selection | None = None, log_files=None,
            options: ReplayOptions | None = None, all_checkpoints: bool = False, batch_step: int | None = None,
            read_progress=None, replay_progress: Progress | None = None) -> Diagnosis:
    """Read the run at ``run_dir``, optionally replay its batches, and diagnose it.

    ``replay=True`` (implied by ``batches`` or ``checkpoint``) replays the run's batch dumps
    (``higgs-diag/batches/``, ``batches/``) or ``batches``, each through the run's checkpoint nearest its step
    (``all_checkpoints``: through every checkpoint; ``checkpoint``: through that one; ``batch_step``: the step
    of batch files that do not say it). When there is nothing to replay, the log report stands and an info finding (HD810) says
    what is missing; ``Diagnosis.replay_error`` holds the reason (the CLI exits 2 on it when the user named
    the batches or the checkpoint). ``select`` / ``ignore``: codes, code prefixes or categories.
    Raises ``RunReadError`` when nothing could be read, ``ValueError`` for a selection that matches no rule.
    """
    from .replay.errors import ReplayError

    sel = _selection(select, ignore, selection)
    run = load_run(run_dir, log_files=log_files, read_progress=read_progress)
    evidence, error = None, None
    if replay or batches or checkpoint is not None:
        opts = options or ReplayOptions()
        if base is not None:
            opts = ReplayOptions(base, opts.lora_alpha, opts.device, opts.dtype, opts.no_model)
        try:
            from .replay.api import measure_run

            evidence = measure_run(run_dir, run, batches=list(batches or ()), checkpoint=checkpoint, options=opts,
                                   thresholds=thresholds, all_checkpoints=all_checkpoints, batch_step=batch_step,
                                   progress=replay_progress)
        except ReplayError as e:
            error = str(e)
            evidence = ReplayEvidence(source=None, batches=[], skipped=error, run_root=str(run_dir), run=run)
    diag = diagnose(run, thresholds=thresholds, selection=sel, evidence=evidence)
    diag.replay_error = error
    return diag


def replay_batch(checkpoint: str | os.PathLike | None, batches: Iterable[str | os.PathLike], *,
                 run_dir: str | os.PathLike | None = None, options: ReplayOptions | None = None,
                 thresholds: Thresholds | None = None, select: Iterable[str] | None = None,
                 ignore: Iterable[str] | None = None, selection: Selection | None = None,
                 batch_step: int | None = None, progress: Progress | None = None) -> Diagnosis:
    """Replay saved batches through a checkpoint and judge them with the replay rules.

    ``checkpoint``: a full model folder, a PEFT adapter folder, a wrapper's ``model.safetensors`` folder, or
    ``checkpoint-N`` with ``lora_adapters/`` (None with ``options.no_model``). ``batches``: ``.pt`` /
    ``.safetensors`` files or folders. ``run_dir``: the output_dir whose logs give the logged losses, args and
    model_config (default: the checkpoint's own); ``batch_step``: the training step of batch files that do not
    say it (their dump meta or a ``step-N`` name). Raises ``ReplayError`` (one line naming the file)."""
    from .replay.api import measure

    sel = _selection(select, ignore, selection)
    ev = measure(checkpoint, batches, run_dir=run_dir, options=options or ReplayOptions(), thresholds=thresholds,
                 batch_step=batch_step, progress=progress)
    target = str(checkpoint) if checkpoint is not None else ", ".join(b.path for b in ev.batches[:3])
    return diagnose(None, thresholds=thresholds, selection=sel, evidence=ev, target=target)


# ---- many runs at once: a sweep folder or several RUN_DIRs -------------------------------------------------
def _looks_like_run(folder: Path) -> bool:
    """A shallow look: does ``folder`` itself hold a run (a trainer state, checkpoints, TensorBoard logs, a
    console log)?"""
    from .layout import EVENT_FILE_MARK, LOGGING_DIR, TRAINER_STATE, is_checkpoint_name

    try:
        with os.scandir(folder) as it:
            for e in it:
                name = e.name
                if name == TRAINER_STATE or name.startswith(EVENT_FILE_MARK) or name.endswith(".log") \
                        or ((name == LOGGING_DIR or is_checkpoint_name(name)) and e.is_dir(follow_symlinks=False)):
                    return True
    except OSError:
        return False
    return False


def find_runs(path: str | os.PathLike) -> list[Path]:
    """The runs under ``path``: ``[path]`` when it is a run itself (or a file), else its immediate sub-folders
    that hold a run (a sweep folder), by name; ``[path]`` when it holds neither (the reader then says why)."""
    p = Path(path)
    if not p.is_dir() or _looks_like_run(p):
        return [p]
    try:
        subs = sorted(d for d in p.iterdir() if d.is_dir() and not d.is_symlink() and _looks_like_run(d))
    except OSError:
        return [p]
    return subs or [p]


def _outcome(run_dir: str, options: dict, output: str | None = None) -> dict:
    """One run of a sweep, in a worker process: its report as a dict (and its report files under ``output``),
    or the error that stopped it."""
    from .run.discover import RunReadError

    try:
        diag = analyze(run_dir, **options)
        if output is not None:
            from .report import write_reports

            write_reports(diag, Path(output))
        return {"run_dir": run_dir, "report": diag.to_dict(), "error": None, "kind": None}
    except RunReadError as e:
        return {"run_dir": run_dir, "report": None, "error": str(e), "kind": "unreadable"}
    except Exception as e:  # noqa: BLE001 - one bad run never stops the others; reported as our bug
        return {"run_dir": run_dir, "report": None, "error": f"{type(e).__name__}: {e}", "kind": "internal"}


def analyze_many(run_dirs: Iterable[str | os.PathLike], *, jobs: int | None = None,
                 outputs: Iterable[str | os.PathLike | None] | None = None, _work: Callable | None = None,
                 **options):
    """Analyze several runs in parallel processes (``jobs``, default the cores this process may use); yields
    one outcome dict per run (``run_dir``, ``report`` (the JSON report) or ``error`` and ``kind``), in the order
    given. ``outputs``: a report folder per run (or None). ``options`` are :func:`analyze`'s keyword options.

    ``kind`` of a failed run: ``"unreadable"`` (its files cannot be read), ``"internal"`` (an exception of ours
    while analyzing it) or ``"crashed"`` (the worker process analyzing it died: killed by the OOM killer's
    SIGKILL, a segfault in a C extension; ``error`` names the signal). A worker death breaks the process pool;
    the runs that finished are kept, those in flight are retried once each in a process of their own (alone,
    so a bystander is not blamed and an out-of-memory run gets the memory to itself), the rest go on in a
    fresh pool. A run whose retry dies too is reported ``"crashed"``; no run is tried more than twice.

    With ``jobs=1`` the runs are analyzed in this process, one after another: no interpreter to start (about
    0.5 s of start-up and imports, the analysis of three small runs), and a debugger or profiler sees the work;
    but a run that kills the process (SIGKILL, a segfault) ends the whole call. Use ``jobs >= 2`` to isolate.

    ``_work`` (private, for tests): a picklable module-level function used instead of :func:`_outcome`, with
    its signature ``(run_dir, options, output) -> outcome dict``."""
    work = _work or _outcome
    dirs = [str(d) for d in run_dirs]
    outs = [str(o) if o is not None else None for o in (outputs or [None] * len(dirs))]
    jobs = max(1, min(jobs or usable_cores(), len(dirs) or 1))
    if jobs == 1:
        for d, o in zip(dirs, outs):
            yield work(d, options, o)
        return
    yield from _pooled(work, [(d, options, o) for d, o in zip(dirs, outs)], jobs)


def _pooled(work: Callable, tasks: list[tuple], jobs: int):
    """``work(*task)`` for each task in a pool of ``jobs`` worker processes (:func:`_start_method`), outcomes
    yielded in task order.

    At most ``jobs`` tasks are submitted at a time, so every submitted task is running (or starting in an idle
    worker) and a broken pool names few suspects (``pool.map`` queues ahead, and a queued task fails with the
    same BrokenProcessPool). Suspects are retried once each with :func:`_alone`; every other task is tried once,
    in a pool. Each round makes progress (a task done or turned suspect), so this ends. The pool is shut down, its
    workers joined, whatever happens (a broken pool's workers are terminated by the executor itself)."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    done: dict[int, dict] = {}
    todo = deque(range(len(tasks)))  # never tried
    suspects: list[int] = []  # in flight when a pool broke
    emitted = 0

    def settle(fut, i) -> bool:
        """Record a finished future's outcome; False when it failed because the pool broke."""
        exc = fut.exception()
        if isinstance(exc, BrokenProcessPool):
            suspects.append(i)
            return False
        if exc is not None:  # not from work() (which catches its own): e.g. pickling the task or its outcome
            done[i] = _failed(tasks[i][0], f"{type(exc).__name__}: {exc}", "internal")
        else:
            done[i] = fut.result()
        return True

    while emitted < len(tasks):
        if suspects:
            suspects.sort()
            i = suspects.pop(0)
            done[i] = _alone(multiprocessing.get_context(_start_method()), work, tasks[i])
        else:
            before = emitted + len(done)  # finished so far
            pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context(
                _start_method()), initializer=_serial_reads)  # decided anew: a broken pool's threads may linger
            running: dict = {}
            try:
                while todo or running:
                    while todo and len(running) < jobs:
                        i = todo.popleft()
                        try:
                            running[pool.submit(work, *tasks[i])] = i
                        except BrokenProcessPool:  # broke between two waits: retry this one in the next pool
                            todo.appendleft(i)
                            break
                    if not running:
                        break
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    if not all([settle(f, running.pop(f)) for f in finished]):
                        for f in wait(running).done:  # the broken pool fails every one still running
                            settle(f, running.pop(f))
                        break
                    while emitted in done:
                        yield done.pop(emitted)
                        emitted += 1
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            if emitted + len(done) == before and not suspects and todo:  # no progress: never loop on pools
                suspects.append(todo.popleft())
        while emitted in done:
            yield done.pop(emitted)
            emitted += 1


def _start_method() -> str:
    """How the workers start: ``fork`` when this process runs a single thread (the workers begin with higgs-diag,
    numpy and pandas already imported: about 0.35 s less per pool, 1.5x -> 1.8x for two workers on 100 small
    runs); ``spawn`` (a fresh interpreter) when another thread runs, Python's or a native library's (a forked
    copy of a multi-threaded process can deadlock on a lock a vanished thread held), or where fork is missing."""
    import multiprocessing

    return "fork" if single_threaded() and "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _failed(run_dir: str, error: str, kind: str) -> dict:
    """The outcome of a run that has no report."""
    return {"run_dir": run_dir, "report": None, "error": error, "kind": kind}


def _alone(ctx, work: Callable, task: tuple) -> dict:
    """``work(*task)`` in a child process of its own; its outcome, or ``"crashed"`` naming how the child died."""
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, work, task), daemon=True)
    child.start()
    send.close()
    try:
        outcome = recv.recv()
    except EOFError:  # it died before sending anything
        outcome = None
    except BaseException:
        child.terminate()
        raise
    finally:
        recv.close()
        child.join()
    if outcome is not None:
        return outcome
    return _failed(task[0], _death(child.exitcode, task[0]), "crashed")


def _serial_reads() -> None:
    """In a worker process: read each run's files one after the other (no forked event-file reader: the other
    workers keep every core busy, and a retried run that may have run out of memory gets no second process)."""
    os.environ[READ_WORKER_ENV] = "0"


def _child(conn, work: Callable, task: tuple) -> None:
    _serial_reads()
    try:
        outcome = work(*task)
    except BaseException as e:  # noqa: BLE001 - work() catches its own; this is a last line
        outcome = _failed(task[0], f"{type(e).__name__}: {e}", "internal")
    conn.send(outcome)
    conn.close()


def _death(exitcode: int | None, run_dir: str) -> str:
    """How a worker died, for the triage table: ``worker process killed by SIGKILL (out of memory?) while
    analyzing RUN ...``."""
    import signal

    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {"SIGKILL": " (out of memory?)", "SIGSEGV": " (a crash in a C extension?)",
                "SIGBUS": " (a crash in a C extension?)"}.get(name, "")
        how = f"killed by {name}{hint}"
    else:
        how = f"exited with code {exitcode}"
    return f"worker process {how} while analyzing {run_dir} (retried once, alone)"
