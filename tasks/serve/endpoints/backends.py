"""An endpoint's backends: a `bentoml serve` of one model version on a free port of 127.0.0.1, started as the
record's candidate, checked with a real generation, and drained of its requests before an update stops it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tasks.serve.endpoints.processes import STATUS_PATH, http, one_line, spawn, started_here, stop_process
from tasks.serve.endpoints.records import Backend, EndpointRecord, logs_dir, now, save
from tasks.serve.model_server import serve_command, serve_env
from tessera.core.processes import free_port
from tasks.serve.settings import ServeSettings
from tessera.core.paths import apply_engine_defaults
from tessera.core.processes import create_time, process_alive

# past a request's generation time limit: reading its body before, writing its answer after
DRAIN_MARGIN_S = 30.0


class BackendFailed(Exception):
    """A backend did not start or failed its check; the message says why."""


def _startup_error(log: Path) -> str | None:
    """Why a BentoML server failed to load its model, from its log: its workers are restarted over and over
    instead of the server exiting, so the log is where a failed start shows."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    if "Traceback (most recent call last)" not in text and "Application startup failed" not in text:
        return None
    errors = re.findall(r"^\s*((?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit)\b:?.*)$", text, re.M)
    return one_line(errors[-1])[:300] if errors else "the model server failed while starting"


def _start_backend(name: str, model_uri: str, version: str, api_key: str | None) -> Backend:
    """A model server for `model_uri`, a version URI (models:/name/N)."""
    apply_engine_defaults()
    port = free_port()
    log = logs_dir(name) / f"backend-v{version}-{port}.log"
    env = serve_env(model_uri, api_key)
    process = spawn(serve_command("127.0.0.1", port), env, log)
    return Backend(model_uri=model_uri, version=version, url=f"http://127.0.0.1:{port}", pid=process.pid,
                   create_time=create_time(process.pid), log=str(log), started_at=now(), settings=ServeSettings.from_env(env))


def _wait_ready(backend: Backend, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    log = Path(backend.log)
    while True:
        child = started_here(backend.pid)
        if (child is not None and child.poll() is not None) or not process_alive(backend.pid, backend.create_time):
            code = f" with code {child.returncode}" if child is not None else ""
            reason = _startup_error(log)
            raise BackendFailed(f"the model server exited{code}" + (f": {reason}" if reason else ""))
        reason = _startup_error(log)
        if reason:
            raise BackendFailed(f"the model server failed to load the model: {reason}")
        if http(f"{backend.url}/readyz")[0] == 200:
            return
        if time.monotonic() > deadline:
            raise BackendFailed(f"the model server was not ready after {timeout:.0f}s")
        time.sleep(0.5)


def check_generation(url: str, api_key: str | None = None, timeout: float = 120) -> str:
    """A real generation of one token; returns the route that answered. /v1/completions first, the chat
    route when the server has no completions route (404)."""
    route, body = "/v1/completions", {"prompt": "Hello", "max_tokens": 1}
    status, answer = http(url + route, api_key, body, timeout=timeout)
    if status == 404:
        route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}
        status, answer = http(url + route, api_key, body, timeout=timeout)
    if status != 200:
        said = one_line(answer.decode(errors="replace"))[:200] if status else "no answer"
        raise BackendFailed(f"its health check (POST {route}, one token) got {status or 'no answer'}" + (f": {said}" if status else ""))
    return route


def bring_up(record: EndpointRecord, model_uri: str, version: str, timeout: float) -> Backend:
    """Start a backend for `model_uri` (version `version`) as the record's candidate, wait until it is ready and
    generates."""
    candidate = _start_backend(record.name, model_uri, version, record.api_key)
    record.candidate, record.updated_at = candidate, now()
    save(record)
    try:
        _wait_ready(candidate, timeout)
        check_generation(candidate.url, record.api_key)
    except BaseException:
        stop_process(candidate.pid, candidate.create_time, grace=10)
        raise
    return candidate


def drain_seconds(backend: Backend) -> float:
    """How long an update lets the old backend's requests finish: as long as one may run there."""
    return backend.settings.request_timeout_s + DRAIN_MARGIN_S


def wait_drained(record: EndpointRecord, old: Backend) -> None:
    """Until the router uses the new backend and has no request left on the old one."""
    deadline = time.monotonic() + drain_seconds(old)
    while time.monotonic() < deadline:
        status, body = http(record.local_url + STATUS_PATH, record.api_key)
        if status != 200:
            return  # no router to drain
        state = json.loads(body)
        if state.get("backend") == record.backend.url and not state.get("inflight", {}).get(old.url):
            return
        time.sleep(0.1)
