"""discover -> read -> one ``Run``: the only place that knows every kind of file a run has."""
from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..layout import is_checkpoint_name
from .discover import RunFiles, RunReadError, discover
from .checkpoint_meta import weights_dtype
from .logs import read_console
from .model import STEP_INT32_LIMIT, ReadProblem, Run, SCALAR_COLUMNS, empty_scalars
from .trainer_state import KEY_ALIASES, read_trainer_state


def canonical_tag(tag: str) -> str:
    """TensorBoard tag -> the name the trainer_state.json uses: ``train/loss`` -> ``loss``,
    ``eval/loss`` -> ``eval_loss``, ``train/learning_rate`` -> ``learning_rate``."""
    if tag.startswith("train/"):
        name = tag[6:]
    elif tag.startswith("eval/"):
        name = "eval_" + tag[5:]
    else:
        name = tag
    return KEY_ALIASES.get(name, name)


def _code_dtype(n_categories: int) -> np.dtype:
    """The integer type pandas keeps a categorical's codes in for ``n_categories`` (so that
    ``Categorical.from_codes`` takes the codes as they are, without a copy)."""
    for t in (np.int8, np.int16, np.int32):
        if n_categories < np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


def _small_int(hi: int) -> np.dtype:
    """The smallest signed integer type holding 0..``hi``."""
    for t in (np.int8, np.int16, np.int32):
        if hi <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


def _segments(step: np.ndarray, metric_codes: np.ndarray, n_metrics: int) -> np.ndarray | None:
    """One file's points in file order: per metric, +1 each time the step goes backwards (a resumed run).
    None when no step goes backwards (every segment 0): then the file's steps never decrease, which one pass
    shows. Otherwise the points are grouped by metric with a stable sort of the small integer codes (numpy's
    radix sort: linear; file order kept within a metric) and the step-backs counted per group."""
    if len(step) < 2 or not (step[1:] < step[:-1]).any():
        return None
    key = metric_codes.astype(np.int16 if n_metrics < np.iinfo(np.int16).max else np.int64)
    order = np.argsort(key, kind="stable")
    k, st = key[order], step[order]
    same = k[1:] == k[:-1]
    csum = np.zeros(len(k), dtype=np.int64)
    np.cumsum(same & (st[1:] < st[:-1]), out=csum[1:])
    starts = np.flatnonzero(np.concatenate(([True], ~same)))  # each metric's first row
    seg = np.empty(len(k), dtype=np.int64)
    seg[order] = csum - np.repeat(csum[starts], np.diff(np.append(starts, len(k))))
    return seg


def _categorical_metric(names: np.ndarray | pd.Categorical) -> pd.Categorical:
    """Canonical metric names as a categorical (TensorBoard tags mapped; several tags may map to one)."""
    cat = names if isinstance(names, pd.Categorical) else pd.Categorical(names)
    canon = [canonical_tag(str(c)) for c in cat.categories]
    uniq = list(dict.fromkeys(canon))
    if uniq == canon and cat.codes.dtype == _code_dtype(len(uniq)):  # nothing renamed: the codes as they are
        return pd.Categorical.from_codes(cat.codes, dtype=pd.CategoricalDtype(pd.Index(uniq, dtype=object)),
                                         validate=False)
    return pd.Categorical.from_codes(_remapped(cat.codes, [uniq.index(c) for c in canon], len(uniq)),
                                     dtype=pd.CategoricalDtype(pd.Index(uniq, dtype=object)), validate=False)


def _remapped(codes: np.ndarray, new: list[int], n_new: int, out: np.ndarray | None = None) -> np.ndarray:
    """Categorical ``codes`` renumbered (code i becomes ``new[i]``; -1 stays -1), in the codes type of
    ``n_new`` categories (into ``out`` when given)."""
    table = np.array([*new, -1], dtype=_code_dtype(n_new))  # index -1 reads the last entry: -1
    if out is None:
        return table[codes]
    np.take(table, codes, out=out)
    return out


def _assemble(parts: list[dict]) -> pd.DataFrame:
    """One tidy frame from the per-file columns, in as few bytes per point as hold them exactly: ``step``
    int32 when every step fits ``model.STEP_INT32_LIMIT`` (int64 otherwise), ``value`` and ``wall_time`` float64,
    ``metric``, ``source`` and ``file`` categoricals (int8 codes for up to 126 values), ``segment`` the smallest
    integer type its largest value fits. Each column is written once: a file's arrays are copied into the
    column preallocated for all files (or used as they are when there is only one file and the type matches),
    and a file's arrays are let go as soon as they are copied (``parts`` is emptied)."""
    if not parts:
        return empty_scalars()
    counts = [len(p["step"]) for p in parts]
    n = sum(counts)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    one = len(parts) == 1

    def column(key: str, dtype, fill=None) -> np.ndarray:
        arrays = [p[key] for p in parts]
        for p in parts:
            p[key] = None  # the copy below is the only one kept
        if one and arrays[0] is not None and arrays[0].dtype == dtype:
            return arrays[0]
        out = np.empty(n, dtype=dtype)
        for i in range(len(arrays)):
            a, arrays[i] = arrays[i], None
            out[bounds[i]:bounds[i + 1]] = a if a is not None else fill
        return out

    # metric: the union of the files' categories in order of appearance (as pandas.union_categoricals)
    union: dict[str, int] = {}
    for p in parts:
        for c in p["metric"].categories:
            union.setdefault(c, len(union))
    metric_codes = np.empty(n, dtype=_code_dtype(len(union))) if not one else None
    segs: list[np.ndarray | None] = []
    lo, hi = 0, 0
    for i, p in enumerate(parts):
        m, st = p["metric"], p["step"]
        new = [union[c] for c in m.categories]
        if one:
            metric_codes = m.codes if new == list(range(len(new))) else _remapped(m.codes, new, len(union))
            codes = metric_codes
        else:
            codes = _remapped(m.codes, new, len(union), out=metric_codes[bounds[i]:bounds[i + 1]])
        p["metric"] = None
        segs.append(_segments(st, codes, len(union)))
        if len(st):
            lo, hi = min(lo, int(st.min())), max(hi, int(st.max()))
    step_dtype = np.int32 if -STEP_INT32_LIMIT <= lo and hi < STEP_INT32_LIMIT else np.int64
    seg_dtype = _small_int(max((int(s.max()) for s in segs if s is not None), default=0))
    segment = np.zeros(n, dtype=seg_dtype)
    for i, s in enumerate(segs):
        if s is not None:
            segment[bounds[i]:bounds[i + 1]] = s
    del segs
    files = [p["file"] for p in parts]
    sources = list(dict.fromkeys(p["source"] for p in parts))
    file_codes = np.repeat(np.arange(len(files), dtype=_code_dtype(len(files))), counts)
    source_codes = np.repeat(np.array([sources.index(p["source"]) for p in parts],
                                      dtype=_code_dtype(len(sources))), counts)
    categorical = lambda codes, names: pd.Categorical.from_codes(  # noqa: E731
        codes, dtype=pd.CategoricalDtype(pd.Index(names, dtype=object)), validate=False)
    cols = {
        "step": column("step", np.dtype(step_dtype)),
        "metric": categorical(metric_codes, list(union)),
        "value": column("value", np.dtype(np.float64)),
        "source": categorical(source_codes, sources),
        "wall_time": column("wall_time", np.dtype(np.float64), fill=np.nan),
        "file": categorical(file_codes, files),
        "segment": segment,
    }
    parts.clear()
    return pd.DataFrame(cols, columns=SCALAR_COLUMNS, copy=False)  # copy=False: no consolidation copy


def _parse_json_text(text: str, file: str, what: str, problems: list[ReadProblem]) -> dict | None:
    try:
        obj = json.loads(text)
    except (ValueError, TypeError, RecursionError):  # JSONDecodeError is a ValueError; so are 4,301-digit ints
        problems.append(ReadProblem(file, f"the `{what}` text summary is not JSON; ignored", kind="unreadable"))
        return None
    return obj if isinstance(obj, dict) else None


def total_bytes(files: RunFiles) -> int:
    """The bytes load_run will read: what a progress bar counts."""
    size = 0
    for p in [*files.trainer_states, *files.event_files, *files.log_files]:
        try:
            size += p.stat().st_size
        except OSError:
            pass
    return size


def _size(p) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def load_run(path: str | os.PathLike, log_files=None, progress=None, files: RunFiles | None = None) -> Run:
    """Read everything the run has. ``progress(nbytes)`` is called after each file (for a progress bar);
    ``files`` lets a caller that already discovered the run skip a second walk."""
    files = files or discover(path, log_files)
    if files.empty:
        raise RunReadError(f"{path}: no trainer_state.json, TensorBoard event file, checkpoint or log found")
    worker = _EventWorker.start(files, _size)  # the event files on the other core while the state files are read
    try:
        return _read(path, files, progress or (lambda n: None), worker)
    finally:
        if worker is not None:
            worker.close()


def _read(path, files: RunFiles, tick, worker: "_EventWorker | None") -> Run:
    size = _size
    run = Run(root=str(path))
    run.checkpoints = files.checkpoints
    for c in run.checkpoints:  # a header read each: the weights are never loaded
        if c.has_full_model or c.has_adapter:
            c.dtype, c.dtype_from = weights_dtype(c.path)
    run.other_files = [f for f, _ in files.not_read]
    parts: list[dict] = []  # per-file columns, assembled once at the end

    # trainer_state.json: every one is read for its fields, the most complete log_history is used.
    results = []
    for p in files.trainer_states:
        res = read_trainer_state(p)
        tick(size(p))
        run.problems.extend(res.problems)
        if res.info is not None:
            run.states.append(res.info)
            run.files_read.append(str(p))
            results.append(res)
    if results:
        def completeness(r):
            gs = r.info.global_step if r.info.global_step is not None else -1
            top = not is_checkpoint_name(Path(r.info.path).parent.name)
            return (gs, r.info.n_entries, top)

        best = max(results, key=completeness)
        run.state = best.info
        if len(best.steps):
            parts.append({"step": np.asarray(best.steps, dtype="int64"),
                          "metric": _categorical_metric(best.metric_categorical()),
                          "value": np.asarray(best.values, dtype="float64"),
                          "wall_time": np.full(len(best.steps), np.nan),
                          "source": "trainer_state", "file": best.info.path})

    # TensorBoard event files, oldest first, all merged (read by the worker started above when there is one).
    if files.event_files:
        results_ev = worker.results() if worker is not None else None
        for i, p in enumerate(files.event_files):
            if results_ev is not None and i < len(results_ev):
                ev, results_ev[i] = results_ev[i], None
            else:  # serial, or what the worker did not read: read here (a reader's exception surfaces here)
                from .events import read_event_file

                ev = read_event_file(p)
            tick(size(p))
            _add_event_file(run, parts, p, ev)
            del ev  # the frame's columns live on in ``parts`` only, until _assemble copies them

    # Console logs: messages, what they say about the end of training, and the series they printed.
    for p in files.log_files:
        res = read_console(p)
        tick(size(p))
        run.log_events.extend(res.events)
        run.problems.extend(res.problems)
        if res.info is not None:
            run.consoles.append(res.info)
        if not res.problems:
            run.files_read.append(str(p))
        if len(res.steps):
            parts.append({"step": np.frombuffer(res.steps, dtype=np.int64),
                          "metric": _categorical_metric(pd.Categorical.from_codes(
                              np.frombuffer(res.metric_codes, dtype=np.int64),
                              categories=pd.Index(res.metric_names, dtype=object))),
                          "value": np.frombuffer(res.values, dtype=np.float64),
                          "wall_time": None,  # NaN: a console line has no time
                          "source": "console", "file": str(p)})

    run.scalars = _assemble(parts)

    if not _usable(run):
        reasons = "; ".join(str(p) for p in run.problems) or f"{path}: nothing a diagnosis can use"
        raise RunReadError(reasons)
    return run


def _add_event_file(run: Run, parts: list[dict], p, ev) -> None:
    """One event file's result into the run: its problems, its scalars (a part), its args/model_config."""
    run.problems.extend(ev.problems)
    if ev.n_records or not ev.problems:
        run.files_read.append(str(p))
    if len(ev.scalars):
        sc = ev.scalars
        tags = sc["tag"].array if isinstance(sc["tag"].dtype, pd.CategoricalDtype) else sc["tag"].to_numpy()
        parts.append({"step": sc["step"].to_numpy(dtype="int64"),
                      "metric": _categorical_metric(tags),
                      "value": sc["value"].to_numpy(dtype="float64"),
                      "wall_time": sc["wall_time"].to_numpy(dtype="float64"),
                      "source": "tensorboard", "file": str(p)})
    for what, attr in (("args", "args"), ("model_config", "model_config")):
        if what in ev.texts:
            obj = _parse_json_text(ev.texts[what], str(p), what, run.problems)
            if obj is not None:  # the newest file wins (files are read oldest first)
                setattr(run, attr, obj)
                setattr(run, attr + "_file", str(p))


def _usable(run: Run) -> bool:
    """Whether anything a check can use was read: scalars, a Trainer state, the logged arguments, a console
    message that matters or the training progress a console showed, or a checkpoint left half-saved (the
    signature of the KeyError at save). Files that were opened but held none of these (a log without any known
    message) do not count."""
    half_saved = any(not c.has_trainer_state and (c.has_full_model or c.has_adapter) for c in run.checkpoints)
    progress = any(c.last_step is not None for c in run.consoles)
    return bool(len(run.scalars) or run.states or run.args or run.model_config or run.log_events or half_saved
                or progress)


# ---- reading the event files in a second process ------------------------------------------------------------
# analyze spends most of its reading time in two files that do not depend on each other: the trainer_state.json
# (json parsing, which holds the GIL) and the event file (numpy). When both are present, at least
# CONCURRENT_MIN_BYTES and the event files at most CONCURRENT_MAX_BYTES, the event files are read in a forked
# child process while this one reads the state files; the child sends each EventFileResult back through a pipe
# (pickle protocol 5, the numpy columns as out-of-band buffers received straight into their final memory).
# Whatever goes wrong in the child (a reader exception, a crash, a broken pipe) is never reported from there: the
# files it did not deliver are read again in this process, so results and errors are exactly the serial ones.
# Serial when fork is unavailable, when this process may use one core only, when another thread runs (a fork
# copies only this one: see single_threaded; the CLI's log-only analyze asks numpy for one BLAS thread, a
# library caller with numpy's default thread pool reads serially), for small files, for large event files (the
# two processes' memory would add up: above CONCURRENT_MAX_BYTES memory matters more than the overlap), in
# `analyze_many`'s worker processes (every core is busy there) and with HIGGS_DIAG_READ_WORKER=0.
# Measured (docs/performance.md, "higgs-diag analyze on a real-size run"): 0.85x the serial wall time for 1.07x
# the CPU on the quiet 2-core machine (15 pairs), 1.01x under load (no idle core); threads were no faster (json
# holds the GIL).
CONCURRENT_MIN_BYTES = 4 * 1024 * 1024  # both the state files and the event files at least this big
CONCURRENT_MAX_BYTES = 256 * 1024 * 1024  # and the event files at most this big
READ_WORKER_ENV = "HIGGS_DIAG_READ_WORKER"  # 0 / false / no / off: always read serially
_HEAD = struct.Struct("<q")


class _EventWorker:
    """A forked child reading the event files; ``results()`` collects them, ``close()`` always reaps it."""

    def __init__(self, pid: int, fd: int, n_files: int):
        self.pid, self.fd, self.n_files = pid, fd, n_files

    @classmethod
    def start(cls, files: RunFiles, size) -> "_EventWorker | None":
        if (not files.trainer_states or not files.event_files or _turned_off(os.environ.get(READ_WORKER_ENV))
                or not hasattr(os, "fork") or not single_threaded() or usable_cores() < 2
                or sum(map(size, files.trainer_states)) < CONCURRENT_MIN_BYTES
                or not CONCURRENT_MIN_BYTES <= sum(map(size, files.event_files)) <= CONCURRENT_MAX_BYTES):
            return None
        from .events import read_event_file  # imported before the fork: the child starts reading at once

        for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        try:
            r, w = os.pipe()
        except OSError:
            return None
        # No signal handler may run between the fork and the moment each side owns its part: a Ctrl-C there would
        # leave the child unreaped (parent) or run the caller's code in the child. Blocked signals stay pending.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        pid = None
        try:
            pid = os.fork()
            if pid == 0:  # the child: read, send, leave without running any of the parent's exit handlers
                code = 1
                try:
                    os.close(r)
                    _detach_child()
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C to the group ends it (code 1)
                    _send_results(w, [read_event_file(p) for p in files.event_files])
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            w = -1
            return cls(pid, r, len(files.event_files))
        except BaseException as e:  # noqa: BLE001 - never leave a child or a pipe behind
            if pid == 0:  # (cannot happen: the child leaves through os._exit) never run the caller's code twice
                os._exit(1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
            if pid is None and isinstance(e, OSError):  # fork failed (no memory, too many processes): read serially
                return None
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a pending Ctrl-C arrives here

    def results(self) -> list | None:
        """The child's EventFileResults, one per event file, or None when it did not deliver them all."""
        try:
            with os.fdopen(self.fd, "rb", buffering=0) as fh:
                self.fd = None
                out = []
                for _ in range(self.n_files):
                    (n_bufs,) = _HEAD.unpack(_read_exactly(fh, bytearray(_HEAD.size)))
                    sizes = [_HEAD.unpack(_read_exactly(fh, bytearray(_HEAD.size)))[0] for _ in range(n_bufs + 1)]
                    head = _read_exactly(fh, bytearray(sizes[0]))
                    buffers = [_read_exactly(fh, bytearray(n)) for n in sizes[1:]]
                    out.append(pickle.loads(head, buffers=buffers))
        except Exception:  # noqa: BLE001 - whatever failed is read again here, where its error surfaces as usual
            return None
        self.close(wait=True)
        return out

    def close(self, wait: bool = False) -> None:
        """Reap the child: waited for after it delivered everything, killed otherwise (an error, an interrupt)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            if not wait:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:  # ChildProcessError: already reaped
            pass


def _turned_off(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


def single_threaded() -> bool:
    """Does this process run one thread, native ones included (numpy's OpenBLAS pool, torch's)? Only then is a
    fork safe: the child gets a copy of the memory but only the forking thread, so a lock another thread held
    stays locked in the child forever. Counted from /proc/self/task; where that is missing (not Linux), False."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under `taskset` or a batch scheduler), which
    ``os.cpu_count()`` over-counts when the process is pinned to fewer."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


_FORK_BLOCKED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


def _detach_child() -> None:
    """In the forked reader: it inherits the caller's stdin/stdout/stderr, and a caller waiting for EOF on a pipe
    of ours must not wait for it, so they go to /dev/null; and it dies with its parent (Linux), instead of
    reading on for a parent that was killed."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() == 1:  # the parent died before the line above: nobody is reading
        os._exit(1)


def _send_results(fd: int, results: list) -> None:
    with os.fdopen(fd, "wb", buffering=0) as fh:
        for res in results:
            buffers: list[pickle.PickleBuffer] = []
            head = pickle.dumps(res, protocol=5, buffer_callback=buffers.append)
            raws = [b.raw() for b in buffers]
            sizes = b"".join(_HEAD.pack(n) for n in [len(raws), len(head), *(r.nbytes for r in raws)])
            for chunk in (sizes, head, *raws):
                view = memoryview(chunk).cast("B")
                while len(view):
                    view = view[fh.write(view):]


def _read_exactly(fh, buf: bytearray) -> bytearray:
    view, got = memoryview(buf), 0
    while got < len(buf):
        k = fh.readinto(view[got:])
        if not k:
            raise EOFError("the event worker stopped early")
        got += k
    return buf
