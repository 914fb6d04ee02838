"""An endpoint's background processes: each started in its own session (it outlives the shell, CLI or flow run that
started it), stopped with all it started, asked over HTTP; and the router, the first of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.serve.endpoints.records import EndpointRecord, logs_dir, record_file, save
from tasks.serve.model_server import REPO_ROOT
from tessera.core.errors import TesseraError
from tessera.core.processes import create_time, stop_tree

STATUS_PATH = "/_tessera/router"  # tasks.serve.router's; not imported, so reading records never imports httpx

_children: dict[int, subprocess.Popen] = {}  # started by this process: reaped when stopped


def spawn(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A process in its own session (Ctrl-C in the starting shell, or the end of a flow run, does not reach it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[process.pid] = process
    return process


def started_here(pid: int) -> subprocess.Popen | None:
    """The process with this pid if this process started it (its exit code can be read), else None."""
    return _children.get(pid)


def stop_process(pid: int | None, started: float | None, grace: float = 30) -> None:
    """Stop a router or model server and all it started (BentoML's workers); SIGTERM first, so that it finishes the
    requests under way. Reaped if this process started it."""
    stop_tree(pid, started, grace, popen=_children.pop(pid, None))


def http(url: str, api_key: str | None = None, body: dict | None = None, timeout: float = 2) -> tuple[int, bytes]:
    """(status, body) of a GET, or a POST of `body` as JSON; status 0 when nothing answered."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return 0, b""


def one_line(text: str) -> str:
    """What a process said (a log, an answer's body), on one line for a message."""
    return " ".join(str(text).split())


def start_router(record: EndpointRecord, timeout: float = 60) -> None:
    """Start the endpoint's router (tasks.serve.router) on its host and port; return once it answers."""
    log = logs_dir(record.name) / "router.log"
    command = [sys.executable, "-m", "tasks.serve.router", str(record_file(record.name)), "--host", record.host, "--port", str(record.port)]
    process = spawn(command, dict(os.environ), log)
    record.router_pid, record.router_create_time = process.pid, create_time(process.pid)
    save(record)
    deadline = time.monotonic() + timeout
    while http(record.local_url + STATUS_PATH, record.api_key)[0] != 200:
        if process.poll() is not None:
            tail = one_line(log.read_text(errors="replace"))[-300:]
            raise TesseraError(f"endpoint {record.name}: its router could not start on {record.host}:{record.port}: {tail}")
        if time.monotonic() > deadline:
            raise TesseraError(f"endpoint {record.name}: its router did not answer after {timeout:.0f}s; see {log}")
        time.sleep(0.2)
