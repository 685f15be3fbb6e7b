"""Reading a run's event files in a forked child process while the state files are read (used by
:func:`higgs_diag.run.load.load_run`)."""
from __future__ import annotations

import os
import pickle
import signal
import struct
import sys

from ..procs import single_threaded, usable_cores
from .discover import RunFiles


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


class EventWorker:
    """A forked child reading the event files; ``results()`` collects them, ``close()`` always reaps it."""

    def __init__(self, pid: int, fd: int, n_files: int):
        self.pid, self.fd, self.n_files = pid, fd, n_files

    @classmethod
    def start(cls, files: RunFiles, size) -> "EventWorker | None":
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
