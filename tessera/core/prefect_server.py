"""The Prefect server that records runs: the user's (PREFECT_API_URL), else the embedded one of this TESSERA_HOME.

The embedded server is one `prefect server start` on 127.0.0.1 with its database in TESSERA_HOME/prefect. The first
run (or `tessera server status`) starts it, under a lock, detached so that it outlives the command that started it;
every later run reuses it, and its UI shows them all. `tessera server stop` stops it. Where a run executes is another
setting (TESSERA_WORK_POOL, tessera.sdk): this only decides which server records it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tessera.core.errors import TesseraError
from tessera.core.paths import file_lock, tessera_home, write_atomic
from tessera.core.processes import create_time, free_port, process_alive, stop_tree

START_TIMEOUT_S = 120.0  # a first start migrates a fresh database: ~8 s here, much longer on a busy 2-core machine


@dataclass(frozen=True)
class EmbeddedServer:
    pid: int
    pid_create_time: float
    url: str  # the API's, ending in /api

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")


def prefect_dir() -> Path:
    return tessera_home() / "prefect"


def _state_file() -> Path:
    return prefect_dir() / "server.json"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def running() -> EmbeddedServer | None:
    """The embedded server of this home if it runs (the very process recorded, answering), else None."""
    try:
        server = EmbeddedServer(**json.loads(_state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return server if process_alive(server.pid, server.pid_create_time) and _healthy(server.url) else None


def spawn() -> tuple[subprocess.Popen, str]:
    """Start this home's server process on a free port, without waiting for it: (the process, its API's URL)."""
    prefect_dir().mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(prefect_dir()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": url}
    with open(prefect_dir() / "server.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # outlives the command that started it; stopped as one tree
        )
    return process, url


def wait_ready(process: subprocess.Popen, url: str) -> EmbeddedServer:
    """Wait until a spawned server answers, and record it as this home's; one that exits or never answers is
    stopped, and a TesseraError says where its log is."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_tree(process.pid, grace=5, popen=process)
            raise TesseraError(f"the embedded Prefect server did not start (see {prefect_dir() / 'server.log'}); "
                               "or set PREFECT_API_URL to a Prefect server of your own")
        time.sleep(0.2)
    server = EmbeddedServer(pid=process.pid, pid_create_time=create_time(process.pid), url=url)
    write_atomic(_state_file(), json.dumps(server.__dict__))
    return server


def ensure_running() -> EmbeddedServer:
    """This home's embedded server, started if it is not running. Under a lock: runs started at the same moment
    start one server, not one each."""
    prefect_dir().mkdir(parents=True, exist_ok=True)
    with file_lock(prefect_dir() / "server.lock"):
        return running() or wait_ready(*spawn())


def use_prefect_api() -> str:
    """The Prefect API that records runs started from this process, set as PREFECT_API_URL for it and for the
    processes it starts: the user's server if they set one, else this home's embedded server (started if needed)."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = ensure_running().url
    return os.environ["PREFECT_API_URL"]


def stop() -> EmbeddedServer | None:
    """Stop this home's embedded server (and the services it started); the one stopped, or None if none ran."""
    with file_lock(prefect_dir() / "server.lock"):
        server = running()
        if server is not None:
            stop_tree(server.pid, server.pid_create_time, grace=10)
        _state_file().unlink(missing_ok=True)
    return server
