"""Stopping an erase run from outside: SIGTERM (``ray job stop``, preemption, ``kill``), Ctrl-C.

``ray job stop`` sends the driver SIGTERM and, ``RAY_JOB_STOP_WAIT_TIME_S`` later (3 s by
default), SIGKILL. Python runs a signal handler only in the main thread and only between
bytecodes, and a driver's main thread can sit in Ray's C++ wait or in a torch kernel for
longer than that; unwinding (workers killed, a local Ray stopped) takes longer still. So what
a rerun needs is done first, by a thread that the signal wakes at once (``signal.set_wakeup_fd``):
the manifest says "interrupted" and the run's lease is released (``RunStop.record``). The main
thread's handler then raises ``Interrupted``, and the run unwinds at its own pace; a SIGKILL
during that loses nothing.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from mace_ray.storage.base import Storage, write_json
from mace_ray.storage.lease import RunLock

log = logging.getLogger("mace_ray")


# What a stop by Ctrl-C is called in a manifest and on the command line (a KeyboardInterrupt
# says nothing of itself).
CTRL_C = "Ctrl-C (SIGINT)"


class Interrupted(BaseException):
    """The driver received SIGTERM (``on_sigterm``): stop, mark the run, let the rerun resume.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """


def stopped_by(e: BaseException) -> BaseException | None:
    """The Interrupted or KeyboardInterrupt behind ``e``, if any. A signal handler that
    raises while Ray's Cython code runs comes back as a SystemError caused by it."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (Interrupted, KeyboardInterrupt)):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


class RunStop:
    """What a stopped run leaves for its rerun, done once, whichever thread gets there first:
    its manifest marked "interrupted" (unless it is complete) and its lease released."""

    def __init__(self, storage: Storage, manifest_key: str, manifest: dict[str, Any], lock: RunLock) -> None:
        self.storage, self.key, self.manifest, self.lock = storage, manifest_key, manifest, lock
        self.recorded = False
        self._mutex = threading.Lock()

    def record(self, why: str) -> None:
        with self._mutex:
            if self.recorded:
                return
            self.recorded = True
            marked = False
            try:
                if self.manifest.get("status") == "running" and not self.lock.lost:
                    self.manifest["status"] = "interrupted"
                    self.manifest["error"] = why
                    write_json(self.storage, self.key, self.manifest)
                    marked = True
            except Exception as e:  # storage trouble: the lease still goes, "running" reads as interrupted
                log.warning("could not mark the run interrupted (%s)", str(e)[:200])
            finally:
                self.lock.release()
        if marked:
            log.info("run marked interrupted (%s) and its lease released; the same command resumes it", why)


@contextmanager
def on_sigterm(on_stop: Callable[[str], None] | None = None) -> Iterator[None]:
    """Turn SIGTERM into ``Interrupted`` in the main thread while the block runs, so the run
    stops cleanly: workers and a local Ray are shut down by the context managers it unwinds
    through. ``on_stop(why)``: called at once on SIGTERM, from a thread of its own, whatever
    the main thread is doing (see the module docstring). Installed again where a library
    (``ray.init``) replaced the handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        why = f"signal {signal.Signals(signum).name}"
        if on_stop is not None:
            on_stop(why)  # a no-op when the watcher got there first
        raise Interrupted(why)

    previous = signal.signal(signal.SIGTERM, handler)
    watcher = _Watcher(on_stop) if on_stop is not None else None
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if watcher is not None:
            watcher.close()


class _Watcher:
    """A thread woken by the signal's wakeup byte (written by Python's C-level handler the
    moment the signal arrives): calls ``on_stop`` on SIGTERM."""

    def __init__(self, on_stop: Callable[[str], None]) -> None:
        self.on_stop = on_stop
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        self.previous = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._run, name="mace-sigterm", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            data = self.reader.recv(64)
            if not data or 0 in data:  # closed, or close()'s sentinel (no signal is number 0)
                return
            if signal.SIGTERM in data:
                try:
                    self.on_stop("signal SIGTERM")
                except Exception as e:  # the main thread's handler tries again
                    log.warning("on SIGTERM: %s", str(e)[:200])

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous)
        with suppress(OSError):  # closed already
            self.writer.send(b"\0")
        self.thread.join(timeout=5)
        self.reader.close()
        self.writer.close()
