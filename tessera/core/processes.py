"""Processes we started: whether a pid is still the very process we started, stopping it with all it started, and
the free local ports they listen on.

A pid alone names nothing for long: once its process ends and is reaped, the kernel may give the pid to another
one. So a process is known by its pid and its start time (psutil's create_time), and only a process that still
matches both is ever signalled.
"""

from __future__ import annotations

import re
import socket
import time
from contextlib import suppress
from subprocess import Popen, TimeoutExpired

# seconds: psutil derives a start time from the boot time, which clock adjustments move, so two reads of one
# process's start time can differ by a moment; a reused pid's start time differs by the life of the first process
CREATE_TIME_TOLERANCE = 1.0


def create_time(pid: int) -> float:
    """The start time of `pid` now; 0.0 when it is gone already, which no live process can ever match."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _live(pid: int | None, started: float | None):
    """psutil's handle on `pid` if it runs (a zombie has exited: it is only waiting to be reaped) and, given its
    start time, is that very process; None otherwise. Raises psutil.AccessDenied where we may not look at it."""
    import psutil

    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if started is not None and abs(proc.create_time() - started) >= CREATE_TIME_TOLERANCE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def process_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether `pid` runs here and, given its start time, is the process started then, not a later one that got
    the same pid. Without a start time (records from before they were kept), any live process of that pid."""
    import psutil

    try:
        return _live(pid, started) is not None
    except psutil.Error:  # exists, but we may not look at it: only a pid alone can be said to run
        return started is None


def _running(proc) -> bool:
    """Whether a process collected earlier still runs: psutil's is_running also checks its start time."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list, timeout: float, popen: Popen | None, resend_every: float | None = None) -> list:
    """Wait up to `timeout` for `procs` to end; the ones still running. Polls rather than psutil.wait_procs, which
    waits out its timeout on a zombie that nobody reaps; reaps `popen` when it ends, so it leaves no zombie. With
    `resend_every`, SIGTERM goes again to those still running that often."""
    start = time.monotonic()
    sent = start
    while True:
        if popen is not None:
            popen.poll()
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= start + timeout:
            return alive
        if resend_every and time.monotonic() - sent >= resend_every:
            _signal(alive, "terminate")
            sent = time.monotonic()
        time.sleep(0.05)


def _tree(root) -> list:
    """The process and all its descendants, collected before any is signalled: a child in a session of its own
    (torchrun's workers, BentoML's) is still a child now, but is reparented, out of reach, once its parent dies."""
    import psutil

    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [root]


def _signal(procs: list, how: str) -> None:
    """`terminate` or `kill` each: psutil signals a process only while its start time still matches."""
    import psutil

    for proc in procs:
        with suppress(psutil.Error):
            getattr(proc, how)()


def stop_tree(pid: int | None, started: float | None = None, grace: float = 30, popen: Popen | None = None,
              resend_every: float | None = None) -> None:
    """Stop a process and everything it started, within `grace` seconds. The process gets SIGTERM first, so that it
    stops its own in order (the flow runs its hooks on its Prefect API, then stops it; torchrun and BentoML stop
    their workers); whatever it leaves behind gets SIGTERM when it has ended, and whatever still runs at the end of
    the grace SIGKILL. Nothing is signalled unless `pid` is still the process started at `started` (or, given the
    `popen` that started it, that process has not ended), so a reused pid is never touched. `popen` is reaped.
    `resend_every`: SIGTERM goes to the process again that often while it runs, for a Python process whose handler
    raises an exception (Prefect's flow engine): one raised inside an object's finalizer is ignored by Python, and
    that SIGTERM is lost (seen here: a flow's SIGTERM landing in a `regex` object's __del__ during tokenization)."""
    import psutil

    try:
        root = None if popen is not None and popen.poll() is not None else _live(pid, started)
    except psutil.Error:  # we may not look at it, so it is not ours to stop
        root = None
    if root is not None:
        deadline = time.monotonic() + grace
        procs = _tree(root)
        _signal(procs[:1], "terminate")
        _wait_gone(procs[:1], grace, popen, resend_every)
        _signal(procs[1:], "terminate")
        _signal(_wait_gone(procs, deadline - time.monotonic(), popen), "kill")
        _wait_gone(procs, 5, popen)
    if popen is not None:
        with suppress(TimeoutExpired):
            popen.wait(timeout=10)


def oom_kill_count() -> int:
    """Processes the kernel's out-of-memory killer has killed: in this cgroup (v2 `memory.events`, v1
    `memory.oom_control`), else as the kernel's log reports them (/dev/kmsg, where readable); 0 where neither is. A
    rise across a run is the evidence that it was the OOM killer that sent a SIGKILL, which the signal alone does not
    tell."""
    from pathlib import Path

    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            for line in Path(path).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return oom_kills_reported(kernel_log())


# the kernel's report of each process its OOM killer ends: "Out of memory: Killed process 4242 (python) ..." or, for a
# cgroup's limit, "Memory cgroup out of memory: Killed process 4242 (python) ..."
OOM_KILL_REPORT = re.compile(r"out of memory: Killed process \d+", re.IGNORECASE)


def oom_kills_reported(messages: list[str]) -> int:
    return sum(1 for message in messages if OOM_KILL_REPORT.search(message))


def kernel_log() -> list[str]:
    """The messages in the kernel's ring buffer (/dev/kmsg: one record a read, "<prio>,<seq>,<usec>,<flags>;<text>"),
    without blocking; [] where it cannot be read (most containers)."""
    import os

    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return []
    messages = []
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BrokenPipeError:  # records overwritten while reading: go on with the next one
                continue
            except OSError:  # BlockingIOError: read to the end
                break
            if not record:
                break
            messages.append(record.decode(errors="replace").partition(";")[2].split("\n", 1)[0])
    finally:
        os.close(fd)
    return messages


def redeliver_lost_sigterms() -> None:
    """A SIGTERM whose handler raises (Prefect's flow engine: TerminationSignal) while Python runs a finalizer is
    lost: Python prints "Exception ignored in ... __del__" and goes on (seen: a `regex` object's __del__ during
    tokenization, so an fm.cancel waited for its 15 s resend). Every exception Python ignores goes through
    sys.unraisablehook: for a TerminationSignal, this process sends itself the SIGTERM again, from a thread, so that
    it lands outside the finalizer. Installed once per process, however often it is called."""
    import os
    import signal
    import sys
    import threading

    previous = sys.unraisablehook
    if getattr(previous, "redelivers_sigterms", False):
        return

    def hook(unraisable) -> None:
        previous(unraisable)
        if unraisable.exc_type is not None and unraisable.exc_type.__name__ == "TerminationSignal":
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()

    hook.redelivers_sigterms = True
    sys.unraisablehook = hook


def skip_final_collection() -> None:
    """Spare this process the garbage collection Python runs over all its objects as it exits: with torch and
    transformers imported that is over a second of one core for nothing (measured: 1.1-1.2 s -> 0.15 s at exit). The
    objects alive now are moved out of the collector's sight (gc.freeze); exit handlers and flushes still run. Call
    it when a process's work is done."""
    import gc

    gc.freeze()


def exit_when_gone(pid: int, started: float | None, poll: float = 1.0) -> None:
    """End this process (exit code 1) within `poll` seconds of the process `pid` (started at `started`) ending: a
    child in a session of its own (a training worker) then never outlives the process that owns its work, even one
    killed with SIGKILL, which has no chance to stop it. Watches from a daemon thread."""
    import os
    import threading

    def watch() -> None:
        while process_alive(pid, started):
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="exit-when-owner-gone", daemon=True).start()


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process, just forked from `parent`, when that process ends, however it ends
    (Linux's PR_SET_PDEATHSIG; elsewhere nothing): a launcher's workers never outlive it, and never train on beside
    the ones a retry starts. Call it first thing after the fork."""
    import ctypes
    import os
    import signal
    import sys

    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it had ended already
            os._exit(1)


# --- ports for the servers and process groups we start, on this host --------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel picks it), for a server or process group about to start."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on `port` of `host` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
