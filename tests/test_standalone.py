"""The launcher of a run's training processes on one node (tasks.train.standalone), started cold as on a machine with
GPUs, on a probe program: each rank gets torchrun's variables and a session of its own, a rank that fails has the
others stopped, and the launcher ends as the first failed rank ended. Training through it: test_trainer.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

PROBE = '''
import json, os, signal, sys, time
env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}

def stop(*_):
    # os.write, not print: a handler's print that lands while the rank's own print holds stdout's lock raises
    # ("reentrant call"); a loaded run once saw a traceback from this print
    os.write(1, f"rank {env['RANK']} stopping\\n".encode())
    os._exit(143)  # as a worker that saved a checkpoint on SIGTERM

signal.signal(signal.SIGTERM, stop)  # before it says it started
print(json.dumps({**env, "own_session": os.getsid(0) == os.getpid(), "argv": sys.argv[1:],
                  "torch_before": "torch" in sys.modules}), flush=True)
what, rank = sys.argv[1], int(env["RANK"])
if what != "ok" and rank == 1:
    time.sleep(2)  # the others are waiting by then
if what == "fail" and rank == 1:
    sys.exit(3)
if what == "killed" and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
if what != "ok":
    time.sleep(60)
'''


@pytest.fixture
def launch(tmp_path, monkeypatch):
    (tmp_path / "probe_rank.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.getcwd()}")
    started = []

    def start(nproc: int, what: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.train.standalone", str(nproc), "probe_rank", what],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def lines(proc: subprocess.Popen) -> tuple[list[dict], list[str]]:
    out = proc.stdout.read().splitlines()
    return [json.loads(line) for line in out if line.startswith("{")], [line for line in out if not line.startswith("{")]


def test_every_rank_gets_torchruns_variables_and_a_session_of_its_own(launch):
    proc = launch(3, "ok")
    assert proc.wait(timeout=60) == 0
    ranks, other = lines(proc)
    assert other == []
    assert sorted(r["RANK"] for r in ranks) == sorted(r["LOCAL_RANK"] for r in ranks) == ["0", "1", "2"]
    assert {(r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"], r["MASTER_ADDR"]) for r in ranks} == {("3", "3", "127.0.0.1")}
    assert len({r["MASTER_PORT"] for r in ranks}) == 1 and all(r["own_session"] and r["argv"] == ["ok"] for r in ranks)
    # started cold (a machine with GPUs), the launcher imported no torch before forking: CUDA is first touched in a rank
    assert not any(r["torch_before"] for r in ranks)


@pytest.mark.parametrize("what, code", [("fail", 3), ("killed", -signal.SIGKILL)])
def test_a_rank_that_fails_stops_the_others_and_its_exit_is_the_launchers(launch, what, code):
    proc = launch(3, what)
    started = time.monotonic()
    assert proc.wait(timeout=60) == code
    assert time.monotonic() - started < 30  # not the others' 60 s of sleep
    _, other = lines(proc)
    assert sorted(other) == ["rank 0 stopping", "rank 2 stopping"]


def test_sigterm_reaches_every_rank_and_the_launcher_ends_as_they_did(launch):
    proc = launch(2, "wait")
    ranks = [json.loads(proc.stdout.readline()) for _ in range(2)]  # both started
    assert sorted(r["RANK"] for r in ranks) == ["0", "1"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    other = lines(proc)[1]
    assert sorted(other) == ["rank 0 stopping", "rank 1 stopping"], "\n".join(other)


def test_a_launcher_killed_with_sigkill_leaves_no_rank_running(launch):
    import psutil

    proc = launch(2, "wait")
    ranks = [psutil.Process(proc.pid).children()[i].pid for i in range(2) if proc.stdout.readline()]
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in ranks):
        assert time.monotonic() < deadline, "a rank trains on without its launcher"
        time.sleep(0.05)
