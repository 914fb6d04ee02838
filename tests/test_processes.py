"""The core's process mechanisms (process identity, stopping a process tree) and its atomic write, on real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress

import psutil
import pytest

from tessera.core.paths import write_atomic
from tessera.core.processes import create_time, process_alive, stop_tree

# a parent that starts a child in a session of its own (as torchrun's workers and BentoML's are), which itself has a
# child; with "ignore" the parent ignores SIGTERM, as a hung launcher would
TREE = """
import signal, subprocess, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen(["sh", "-c", "sleep 60; :"], start_new_session=True)
print("started", flush=True)
time.sleep(60)
"""


@pytest.fixture
def tree():
    """Start the tree; yield (its Popen, the (pid, start time) of each of its 3 processes); kill any left over."""
    started = []

    def start(ignore_term: bool = False):
        parent = subprocess.Popen([sys.executable, "-c", TREE, "ignore" if ignore_term else "obey"],
                                  stdout=subprocess.PIPE, text=True)
        parent.stdout.readline()
        deadline = time.monotonic() + 2
        while len(psutil.Process(parent.pid).children(recursive=True)) < 2:  # the child's own child: sleep
            assert time.monotonic() < deadline
            time.sleep(0.02)
        procs = [psutil.Process(parent.pid), *psutil.Process(parent.pid).children(recursive=True)]
        started.extend(procs)
        return parent, [(p.pid, p.create_time()) for p in procs]

    yield start
    for proc in started:
        with suppress(psutil.Error):
            proc.kill()


def test_stop_tree_stops_the_process_and_all_it_started_a_new_session_included(tree):
    parent, members = tree()
    assert os.getsid(members[1][0]) != os.getsid(parent.pid)  # the child runs in a session of its own
    began = time.monotonic()
    stop_tree(parent.pid, create_time(parent.pid), grace=2, popen=parent)
    assert time.monotonic() - began < 2  # all of them ended at the SIGTERM, none waited for the kill
    assert [pid for pid, started in members if process_alive(pid, started)] == []
    assert parent.returncode == -signal.SIGTERM  # reaped, with its own exit status


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(tree):
    parent, members = tree(ignore_term=True)
    began = time.monotonic()
    stop_tree(parent.pid, grace=0.5, popen=parent)
    assert 0.5 <= time.monotonic() - began < 2.5
    assert [pid for pid, started in members if process_alive(pid, started)] == []
    assert parent.returncode == -signal.SIGKILL


def test_a_reused_pid_is_never_signalled(tree):
    parent, members = tree()
    stop_tree(parent.pid, create_time(parent.pid) - 1000, grace=0)  # the pid of a process that ended long ago
    time.sleep(0.2)
    assert all(process_alive(pid, started) for pid, started in members)
    assert parent.poll() is None


def test_a_process_is_known_by_its_pid_and_start_time_and_a_zombie_is_gone():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        started = create_time(proc.pid)
        assert process_alive(proc.pid, started) and process_alive(proc.pid, started + 0.5)  # a clock adjustment
        assert not process_alive(proc.pid, started - 1000)  # the same pid, another process
        proc.kill()
        deadline = time.monotonic() + 2
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not yet reaped
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not process_alive(proc.pid, started) and not process_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_write_atomic_leaves_the_whole_file_and_no_temp_file(tmp_path):
    path = tmp_path / "records" / "run.json"
    write_atomic(path, json.dumps({"status": "RUNNING"}))
    write_atomic(path, json.dumps({"status": "COMPLETED", "rows": list(range(1000))}))
    assert json.loads(path.read_text())["status"] == "COMPLETED"
    assert os.listdir(path.parent) == ["run.json"]
    assert path.stat().st_mode & 0o777 == 0o600  # records may hold an API key


def test_a_write_that_fails_leaves_the_previous_content(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_atomic(path, json.dumps({"status": "RUNNING"}))

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, json.dumps({"status": "COMPLETED"}))
    assert json.loads(path.read_text()) == {"status": "RUNNING"}
    assert os.listdir(tmp_path) == ["run.json"]


def test_the_kernel_s_reports_of_out_of_memory_kills_are_counted():
    """Where the cgroup keeps no count (no memory.events: this machine), the kernel's own report of each kill is the
    evidence that a SIGKILL came from the OOM killer; other kernel messages about memory are not."""
    from tessera.core.processes import kernel_log, oom_kills_reported

    reports = [
        "Out of memory: Killed process 4242 (python) total-vm:9126824kB, anon-rss:7735012kB, file-rss:0kB",
        "Memory cgroup out of memory: Killed process 77 (pt_main_thread) total-vm:2097152kB, anon-rss:1048576kB",
        "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),task=python,pid=4242,uid=0",  # the same kill, once more
        "python invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0, oom_score_adj=0",
        "EXT4-fs (vda): mounted filesystem r/w without journal",
    ]
    assert oom_kills_reported(reports) == 2
    if os.access("/dev/kmsg", os.R_OK):  # read for real, where it can be: whole messages, none of the record header
        messages = kernel_log()
        assert messages and not any(m[:1].isdigit() and ";" in m[:30] for m in messages[:5]), messages[:5]


LOST_SIGTERM = """
import os, signal, sys, time
from tessera.core.processes import redeliver_lost_sigterms

class TerminationSignal(BaseException):  # as Prefect's flow engine raises it from its SIGTERM handler
    pass

def handler(signum, frame):
    raise TerminationSignal()

class Finalized:
    def __del__(self):  # the SIGTERM lands here: its exception is one Python ignores
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)

signal.signal(signal.SIGTERM, handler)
if sys.argv[1] == "redeliver":
    redeliver_lost_sigterms()
    installed = sys.unraisablehook
    redeliver_lost_sigterms()
    assert sys.unraisablehook is installed  # once per process, however often it is called
try:
    Finalized()
    time.sleep(2)
    print("the SIGTERM was lost")
except TerminationSignal:
    print("stopped by the SIGTERM")
"""


@pytest.mark.parametrize("redeliver", [True, False], ids=["redelivered", "lost-without"])
def test_a_sigterm_whose_exception_a_finalizer_swallowed_is_delivered_again(redeliver):
    out = subprocess.run([sys.executable, "-c", LOST_SIGTERM, "redeliver" if redeliver else "no"],
                         capture_output=True, text=True, timeout=60)
    assert "Exception ignored in" in out.stderr and "TerminationSignal" in out.stderr  # the first one was swallowed
    assert out.stdout.strip() == ("stopped by the SIGTERM" if redeliver else "the SIGTERM was lost"), out
    assert out.returncode == 0, out.stderr
