"""The fork server (tessera.core.forkserver): a program forked from it runs as a cold start of it would, and its
exit status, signals and process listing reach the caller; servers are reused only where a cold start would match."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

PROBE = '''
import json, os, sys, time
from probe_imports import IMPORTED_BY  # the server's pid when forked from it, as the program's imports are its
if __name__ == "__main__":
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                      "own_session": os.getsid(0) == os.getpid(), "imported_by": IMPORTED_BY,
                      "stdin": sys.stdin.read()}), flush=True)
    what = sys.argv[1]
    if what == "sleep":
        time.sleep(120)
    elif what == "exit":
        sys.exit(int(sys.argv[2]))
    elif what == "raise":
        raise ValueError("a traceback as Python prints it")
    elif what == "say":
        sys.exit(sys.argv[2])
'''


@pytest.fixture
def servers(monkeypatch, tmp_path):
    """A folder of fork servers of its own (a short path: a socket's is limited), and a probe program to fork."""
    from tessera.core import forkserver

    folder = tempfile.mkdtemp(prefix="fs-")
    (tmp_path / "probe_program.py").write_text(PROBE)
    (tmp_path / "probe_imports.py").write_text("import os\nIMPORTED_BY = os.getpid()\n")
    monkeypatch.setenv("TESSERA_FORKSERVER_DIR", folder)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.delenv("TESSERA_FORKSERVER", raising=False)
    yield Path(folder)
    forkserver.stop_all()
    shutil.rmtree(folder, ignore_errors=True)


def start(*args: str, env: dict | None = None, preload=("probe_program",)):
    from tessera.core import forkserver

    return forkserver.popen([sys.executable, "-m", "probe_program", *args], env or dict(os.environ, PROBE="p1"), preload)


def server_pids(folder: Path) -> list[int]:
    return sorted(json.loads(p.read_text())[0] for p in folder.glob("*.pid"))


def test_a_forked_program_gets_its_own_arguments_environment_folder_and_session_and_its_exit_status(servers, tmp_path, monkeypatch):
    from tessera.core import forkserver

    monkeypatch.chdir(tmp_path)
    results = []
    for args in (["exit", "0"], ["exit", "3"], ["raise"], ["say", "a message"]):
        with start(*args) as proc:
            out = proc.stdout.read()
        assert isinstance(proc, forkserver.ForkedProcess)
        results.append((proc.returncode, out))
    [(code0, out0), (code3, _), (raised, traceback), (said, message)] = results
    seen = json.loads(out0.splitlines()[0])
    assert code0 == 0 and code3 == 3 and raised == 1 and said == 1
    assert seen["argv"] == ["exit", "0"] and seen["cwd"] == str(tmp_path) and seen["probe"] == "p1"
    assert seen["own_session"] and seen["stdin"] == ""
    assert seen["imported_by"] == server_pids(servers)[0], "the program's imports were not done by the server"
    assert "ValueError: a traceback as Python prints it" in traceback and "a message" in message
    assert "RuntimeWarning" not in traceback  # runpy's, for a module run after it was imported
    assert len(server_pids(servers)) == 1  # one server for all four


def test_a_forked_process_is_listed_stopped_by_its_signal_and_outlives_a_stopped_server(servers):
    from tessera.core import forkserver
    from tessera.core.processes import stop_tree

    proc = start("sleep")
    first = json.loads(proc.stdout.readline())
    assert first["argv"] == ["sleep"]
    assert [(pid, cmd[2:]) for pid, cmd in forkserver.forked()] == [(proc.pid, ["probe_program", "sleep"])]
    [server] = server_pids(servers)
    assert psutil.Process(proc.pid).ppid() == server

    stop = subprocess.run([sys.executable, "-m", "tessera.cli", "server", "stop"], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=60)  # forks no more, but waits for the process it runs
    assert f"stopped the fork server(s) in {servers}" in stop.stdout, stop.stdout + stop.stderr
    time.sleep(0.5)
    assert psutil.pid_exists(server) and proc.poll() is None
    assert not list(servers.glob("*.sock"))
    stop_tree(proc.pid, grace=5, popen=proc)
    assert proc.returncode == -signal.SIGTERM
    assert forkserver.forked() == []
    psutil.Process(server).wait(timeout=10)  # and then ends

    with start("exit", "0") as again:  # the next one starts a new server
        again.stdout.read()
    assert again.returncode == 0 and server_pids(servers) != [server]


def test_another_import_time_environment_gets_another_server_and_cold_starts_stay_cold(servers, monkeypatch):
    from tessera.core import forkserver

    for threads in ("1", "2", "1"):
        with start("exit", "0", env=dict(os.environ, OMP_NUM_THREADS=threads)) as proc:
            proc.stdout.read()
    assert len(server_pids(servers)) == 2  # a server's own thread count is fixed as it imports: one per value
    assert isinstance(start("exit", "0", preload=("json",)), subprocess.Popen)  # not a preloaded program
    with monkeypatch.context() as gpus:  # a GPU machine: a CUDA driver touched in the server would poison forks
        gpus.setattr(forkserver, "_has_gpus", lambda: True)
        assert isinstance(start("exit", "0"), subprocess.Popen)
    monkeypatch.setenv("TESSERA_FORKSERVER", "0")
    cold = start("exit", "4")
    assert isinstance(cold, subprocess.Popen) and cold.wait(timeout=30) == 4
    assert json.loads(cold.stdout.readline())["imported_by"] == cold.pid
    cold.stdout.close()


def test_a_server_that_cannot_start_leaves_programs_to_start_cold_and_is_not_tried_again(servers, tmp_path, capfd):
    (tmp_path / "broken_program.py").write_text("raise ImportError('cannot be imported twice')\n")
    from tessera.core import forkserver

    started = time.monotonic()
    for _ in range(2):
        proc = forkserver.popen([sys.executable, "-m", "broken_program"], dict(os.environ), ("broken_program",))
        assert isinstance(proc, subprocess.Popen)
        assert proc.wait(timeout=30) == 1 and "cannot be imported twice" in proc.stdout.read()
        proc.stdout.close()
    said = capfd.readouterr().err
    assert "did not start (see " in said and "failed to start before" in said
    assert time.monotonic() - started < 20
