"""The embedded Prefect server of a TESSERA_HOME: started once under a lock, reused by every run, managed with
`tessera server status|start|stop`; a user's own PREFECT_API_URL wins over it."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest


def tessera(*args, env):
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_one_embedded_server_per_home_started_once_and_stopped(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "TESSERA_FORKSERVER_DIR")}
    env["TESSERA_HOME"] = str(tmp_path / "home")  # its fork servers too: none runs there
    assert tessera("server", "status", env=env).stdout.startswith("no embedded Prefect server runs")

    # three commands at once start one server: the others wait on the lock and find it
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: tessera("server", "start", env=env), range(3)))
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    lines = {o.stdout for o in outs}
    assert len(lines) == 1 and lines.pop().startswith("Prefect UI: http://127.0.0.1:"), [o.stdout for o in outs]
    status = tessera("server", "status", env=env).stdout
    ui = status.split()[2]
    pid = int(status.split("pid ")[1].split(",")[0])
    with urllib.request.urlopen(f"{ui}/api/health", timeout=5) as r:
        assert r.status == 200
    assert psutil.Process(pid).is_running()

    stopped = tessera("server", "stop", env=env)
    assert stopped.stdout.strip() == f"stopped the embedded Prefect server at {ui}", stopped
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert tessera("server", "status", env=env).stdout.startswith("no embedded Prefect server runs")


def test_a_users_prefect_api_url_wins_over_the_embedded_server(tmp_path):
    env = dict(os.environ, TESSERA_HOME=str(tmp_path / "home"), PREFECT_API_URL="http://127.0.0.1:9/api")
    out = tessera("server", "status", env=env)
    assert out.returncode == 0 and "PREFECT_API_URL=http://127.0.0.1:9/api" in out.stdout, out
    assert not (tmp_path / "home" / "prefect" / "server.json").exists()
