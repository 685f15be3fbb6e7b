"""One fresh-process measurement for the benchmarks: wall seconds, CPU seconds and peak RSS of a command.

Used by bench_analyze (and through it bench_growth), bench_triage, bench_run_memory and bench_replay, so that
every table that says "wall s", "cpu s" or "peak RSS MB" means the same thing.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(argv: list[str], env: dict | None = None, cwd: str | os.PathLike | None = REPO) -> dict:
    """Run ``argv`` in a fresh process (working directory ``cwd``, the repository by default; environment ``env``,
    the caller's when None) and wait for it. Returns

    - ``wall``: seconds from the start of the process to its end (interpreter start and imports included);
    - ``cpu``: user + system seconds of the process and of the children it waited for (a --jobs N parent's
      workers, a shell loop's commands);
    - ``rss_mb``: peak resident set size in MiB (``ru_maxrss / 1024``): the largest single process among it and
      the children it waited for, not a sum;
    - ``rc``: exit code (negative: killed by that signal);
    - ``stdout``, ``stderr``: its output, decoded (undecodable bytes replaced).

    The child is reaped with ``os.wait4``, whose rusage is that child's own (``getrusage(RUSAGE_CHILDREN)`` would
    give the maximum over every earlier child too). Its output goes to temporary files, not pipes, so a large
    report cannot block it. Linux keeps the high-water RSS of the address space a process had before ``exec``:
    a child started from this process reports at least this process's own peak RSS, which matters only when
    the calling benchmark is itself larger than what it measures.
    """
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=fo, stderr=fe, cwd=None if cwd is None else str(cwd), env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024.0, "rc": p.returncode,
                "stdout": fo.read().decode(errors="replace"), "stderr": fe.read().decode(errors="replace")}


def installed_env(name: str) -> dict:
    """The environment of a child that should run higgs-diag as an installed package does: with its .pyc files.
    pip writes them at install time, and an editable install on first use, unless PYTHONDONTWRITEBYTECODE is set
    (as on the development machine), which would make every child compile our modules again (~0.06 s). The
    children share a bytecode cache in a temporary folder (never in the repo; removed when this process exits):
    run one warm-up child, not counted, to fill it. Third-party packages keep their installed .pyc files only
    when this env is not used for them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = pyc = tempfile.mkdtemp(prefix=f"bench-{name}-pyc-")
    atexit.register(shutil.rmtree, pyc, True)
    return env
