"""Named endpoints: one URL for a registered model, whose version can be replaced without a failed request.

An endpoint is two kinds of background process, each in its own session so that it outlives the shell,
CLI or flow run that started it:

- a router (tasks.serve.router) on the endpoint's host and port: the URL clients use, for the endpoint's
  whole lifetime;
- a backend: `bentoml serve` of tasks.serve.service on a free port of 127.0.0.1, serving one model
  version. The router forwards every request to the backend named in the endpoint's record.

An update starts the new version beside the old one, checks it with a real generation, then switches the
router (by writing the record), waits for the old backend's requests to finish and stops it. A version
that does not start or fails its check is stopped, and the old one keeps serving (rollback).

State: TESSERA_HOME/endpoints/NAME.json (the record, written atomically, readable by owner only: it holds
the API key), NAME.lock (held while a command changes the endpoint) and NAME/ (the processes' logs).
Status is checked when read: the processes must be alive and be the ones we started (same create time),
and /readyz must answer through the router.

Alias URIs (`models:/name@champion`) are followed by default: `update NAME` without `--model` serves
whatever version the alias points at then. A version URI (`models:/name/3`) stays on that version. Either way
a model server is given the version itself (`models:/name/3`), never the alias: when BentoML restarts one of
its workers, the worker loads the version the record names, not wherever the alias has moved since.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from enum import Enum
from pathlib import Path

from pydantic import BaseModel

from tessera.core import registry
from tasks.serve.model_server import REPO_ROOT, free_port, serve_command, serve_env
from tessera.core.errors import ConfigError, LockTimeout, TesseraError
from tessera.core.paths import apply_engine_defaults, file_lock, is_locked, tessera_home, write_atomic
from tessera.core.processes import create_time, process_alive, stop_tree
from tasks.serve.settings import ServeSettings

DEFAULT_PORT = 3000
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
STATUS_PATH = "/_tessera/router"  # tasks.serve.router's; not imported, so reading records never imports httpx


class EndpointStatus(str, Enum):
    STARTING = "STARTING"  # `serve` is bringing it up
    READY = "READY"  # router and backend are ours, alive, and /readyz answers
    UPDATING = "UPDATING"  # an update is checking a new version; the old one serves
    NOT_READY = "NOT_READY"  # the processes are alive but /readyz does not answer
    FAILED = "FAILED"  # a process is gone, or the endpoint never started
    STOPPED = "STOPPED"  # `stop` stopped it


class Backend(BaseModel):
    """One `bentoml serve` process serving one model version."""

    model_uri: str  # what the server was given: always the version (models:/name/N), never an alias
    version: str  # the registered version it serves
    url: str
    pid: int
    create_time: float
    log: str
    started_at: dt.datetime
    # its limits, from the environment it was started with: the router applies its body limit, and an update
    # lets its requests run to their time limit (a record written before they were kept: the defaults)
    settings: ServeSettings = ServeSettings()


class EndpointRecord(BaseModel):
    name: str
    model_uri: str  # what the endpoint serves: models:/name@alias (followed) or models:/name/N
    follow: bool  # re-resolve the alias on update
    registered_model: str
    version: str | None = None  # the version being served
    host: str
    port: int
    url: str
    api_key: str | None = None
    router_pid: int | None = None
    router_create_time: float | None = None
    backend: Backend | None = None
    candidate: Backend | None = None  # a version being started or checked
    status: EndpointStatus = EndpointStatus.STARTING
    created_at: dt.datetime
    updated_at: dt.datetime
    details: str | None = None
    history: list[str] = []  # one line per change of version, oldest first

    @property
    def local_url(self) -> str:
        """The router as this machine reaches it (a router on 0.0.0.0 answers on 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"


class BackendFailed(Exception):
    """A backend did not start or failed its check; the message says why."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def endpoints_dir() -> Path:
    return tessera_home() / "endpoints"


def record_file(name: str) -> Path:
    return endpoints_dir() / f"{name}.json"


def logs_dir(name: str) -> Path:
    return endpoints_dir() / name


# --- names and model URIs ---------------------------------------------------------------------------------

def default_name(model_uri: str) -> str:
    """An endpoint's name when none is given: the model's own (last) name, `main.support.bot` -> `bot`."""
    model = registry.parse_model_uri(model_uri).name.split(".")[-1]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", model).strip("-_") or "endpoint"
    return name[:63]


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"endpoint name {name!r}: use letters, digits, '-' and '_' (at most 63, starting with a letter or digit)")
    return name


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- records ----------------------------------------------------------------------------------------------

def save(record: EndpointRecord) -> EndpointRecord:
    """Write atomically (the router re-reads the file when it changes), readable by its owner only."""
    write_atomic(record_file(record.name), record.model_dump_json(indent=2))
    return record


def load(name: str) -> EndpointRecord:
    """The record as last written; `get` adds the processes' current state."""
    path = record_file(check_name(name))
    if not path.exists():
        raise TesseraError(f"no endpoint named {name!r} (endpoints live in {endpoints_dir()}; see tessera endpoints list)")
    return EndpointRecord.model_validate_json(path.read_text())


_held: set[str] = set()  # endpoints this process is changing


def _lock_file(name: str) -> Path:
    return endpoints_dir() / f"{name}.lock"


@contextlib.contextmanager
def _changing(name: str, wait: bool = False):
    """Held while a command changes an endpoint: one serve/update/stop at a time. Released if its holder dies.
    With `wait`, a command waits its turn (an update behind another: back-to-back retrains that both promote);
    without, a lock held for more than a moment (another command at work) is an error."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(_lock_file(name), timeout=None if wait else 2))  # probes hold it an instant
        except LockTimeout:
            raise TesseraError(
                f"endpoint {name}: another command is changing it (serve, update or stop); try again when it ends"
            ) from None
        _held.add(name)
        held.callback(_held.discard, name)
        yield


def _being_changed(name: str) -> bool:
    """Whether another process is serving, updating or stopping the endpoint now."""
    return name not in _held and is_locked(_lock_file(name))


# --- processes --------------------------------------------------------------------------------------------

_children: dict[int, subprocess.Popen] = {}  # started by this process: reaped when stopped


def _spawn(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A process in its own session (Ctrl-C in the starting shell, or the end of a flow run, does not reach it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[process.pid] = process
    return process


def _stop_process(pid: int | None, started: float | None, grace: float = 30) -> None:
    """Stop a router or model server and all it started (BentoML's workers); SIGTERM first, so that it finishes the
    requests under way. Reaped if this process started it."""
    stop_tree(pid, started, grace, popen=_children.pop(pid, None))


def _http(url: str, api_key: str | None = None, body: dict | None = None, timeout: float = 2) -> tuple[int, bytes]:
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
    return _one_line(errors[-1])[:300] if errors else "the model server failed while starting"


# --- backends ---------------------------------------------------------------------------------------------

def _start_backend(name: str, model_uri: str, version: str, api_key: str | None) -> Backend:
    """A model server for `model_uri`, a version URI (models:/name/N)."""
    apply_engine_defaults()
    port = free_port()
    log = logs_dir(name) / f"backend-v{version}-{port}.log"
    env = serve_env(model_uri, api_key)
    process = _spawn(serve_command("127.0.0.1", port), env, log)
    return Backend(model_uri=model_uri, version=version, url=f"http://127.0.0.1:{port}", pid=process.pid,
                   create_time=create_time(process.pid), log=str(log), started_at=now(), settings=ServeSettings.from_env(env))


def _wait_ready(backend: Backend, api_key: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    log = Path(backend.log)
    while True:
        child = _children.get(backend.pid)
        if (child is not None and child.poll() is not None) or not process_alive(backend.pid, backend.create_time):
            code = f" with code {child.returncode}" if child is not None else ""
            reason = _startup_error(log)
            raise BackendFailed(f"the model server exited{code}" + (f": {reason}" if reason else ""))
        reason = _startup_error(log)
        if reason:
            raise BackendFailed(f"the model server failed to load the model: {reason}")
        if _http(f"{backend.url}/readyz")[0] == 200:
            return
        if time.monotonic() > deadline:
            raise BackendFailed(f"the model server was not ready after {timeout:.0f}s")
        time.sleep(0.5)


def check_generation(url: str, api_key: str | None = None, timeout: float = 120) -> str:
    """A real generation of one token; returns the route that answered. /v1/completions first, the chat
    route when the server has no completions route (404)."""
    route, body = "/v1/completions", {"prompt": "Hello", "max_tokens": 1}
    status, answer = _http(url + route, api_key, body, timeout=timeout)
    if status == 404:
        route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}
        status, answer = _http(url + route, api_key, body, timeout=timeout)
    if status != 200:
        said = _one_line(answer.decode(errors="replace"))[:200] if status else "no answer"
        raise BackendFailed(f"its health check (POST {route}, one token) got {status or 'no answer'}" + (f": {said}" if status else ""))
    return route


def _bring_up(record: EndpointRecord, model_uri: str, version: str, timeout: float) -> Backend:
    """Start a backend for `model_uri` (version `version`) as the record's candidate, wait until it is ready and
    generates."""
    candidate = _start_backend(record.name, model_uri, version, record.api_key)
    record.candidate, record.updated_at = candidate, now()
    save(record)
    try:
        _wait_ready(candidate, record.api_key, timeout)
        check_generation(candidate.url, record.api_key)
    except BaseException:
        _stop_process(candidate.pid, candidate.create_time, grace=10)
        raise
    return candidate


# past a request's generation time limit: reading its body before, writing its answer after
DRAIN_MARGIN_S = 30.0


def drain_seconds(backend: Backend) -> float:
    """How long an update lets the old backend's requests finish: as long as one may run there."""
    return backend.settings.request_timeout_s + DRAIN_MARGIN_S


def _wait_drained(record: EndpointRecord, old: Backend) -> None:
    """Until the router uses the new backend and has no request left on the old one."""
    deadline = time.monotonic() + drain_seconds(old)
    while time.monotonic() < deadline:
        status, body = _http(record.local_url + STATUS_PATH, record.api_key)
        if status != 200:
            return  # no router to drain
        state = json.loads(body)
        if state.get("backend") == record.backend.url and not state.get("inflight", {}).get(old.url):
            return
        time.sleep(0.1)


# --- the endpoint's lifecycle -----------------------------------------------------------------------------

def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _start_router(record: EndpointRecord, timeout: float = 60) -> None:
    log = logs_dir(record.name) / "router.log"
    command = [sys.executable, "-m", "tasks.serve.router", str(record_file(record.name)), "--host", record.host, "--port", str(record.port)]
    process = _spawn(command, dict(os.environ), log)
    record.router_pid, record.router_create_time = process.pid, create_time(process.pid)
    save(record)
    deadline = time.monotonic() + timeout
    while _http(record.local_url + STATUS_PATH, record.api_key)[0] != 200:
        if process.poll() is not None:
            tail = _one_line(log.read_text(errors="replace"))[-300:]
            raise TesseraError(f"endpoint {record.name}: its router could not start on {record.host}:{record.port}: {tail}")
        if time.monotonic() > deadline:
            raise TesseraError(f"endpoint {record.name}: its router did not answer after {timeout:.0f}s; see {log}")
        time.sleep(0.2)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(model_uri: str, name: str | None = None, host: str = "127.0.0.1", port: int | None = None,
          api_key: str | None = None, follow: bool | None = None, timeout: float = 300) -> EndpointRecord:
    """Start an endpoint serving a registered version or alias, in the background; return once it generates.

    `port` None: 3000 if free, else any free port. `follow` (default: whether the URI is an alias) makes
    `update` re-resolve the alias; `follow=False` on an alias pins the version it points at now.
    """
    registered, _, alias = registry.parse_model_uri(model_uri)
    name = check_name(name or default_name(model_uri))
    if not api_key and host not in LOOPBACK:
        print(f"warning: endpoint {name} listens on {host} without an API key: anyone who can reach it can use the model "
              "(set --api-key or TESSERA_API_KEY)", file=sys.stderr)
    if follow is None:
        follow = alias is not None
    if follow and alias is None:
        raise ConfigError(f"{model_uri}: only an alias (models:/<name>@<alias>) can be followed")
    with _changing(name):
        if record_file(name).exists():
            existing = get(name)
            if existing.status not in (EndpointStatus.STOPPED, EndpointStatus.FAILED):
                raise TesseraError(
                    f"endpoint {name} is already {existing.status.value} at {existing.url} ({existing.model_uri}); "
                    f"change its model with: tessera endpoints update {name} --model URI, or pick another --name"
                )
            _stop_processes(existing, grace=10)  # what is left of a failed one
        version = str(registry.resolve(model_uri).version)
        if port is None:
            port = DEFAULT_PORT if _port_free(host, DEFAULT_PORT) else free_port(host)
        elif not _port_free(host, port):
            raise TesseraError(f"port {port} on {host} is in use; pick another --port")
        pinned = f"models:/{registered}/{version}"
        served_uri = model_uri if follow else pinned
        record = save(EndpointRecord(
            name=name, model_uri=served_uri, follow=follow, registered_model=registered, host=host, port=port,
            url=f"http://{host}:{port}", api_key=api_key, created_at=now(), updated_at=now(),
        ))
        os.chmod(record_file(name), 0o600)
        try:
            _start_router(record)
            record.backend, record.candidate = _bring_up(record, pinned, version, timeout), None
        except BaseException as exc:
            _stop_processes(record, grace=10)
            reason = str(exc) if isinstance(exc, (BackendFailed, TesseraError)) else f"interrupted ({type(exc).__name__})"
            record.candidate, record.status, record.updated_at = None, EndpointStatus.FAILED, now()
            record.details = f"{served_uri} (version {version}) failed to start: {reason}"
            save(record)
            if isinstance(exc, BackendFailed):
                raise TesseraError(f"endpoint {name}: {record.details} (logs: {logs_dir(name)})") from None
            raise
        record.version, record.status, record.updated_at = version, EndpointStatus.READY, now()
        record.details = None
        record.history.append(f"{now():%Y-%m-%d %H:%M:%S} serving version {version} ({served_uri})")
        return save(record)


def update(name: str, model_uri: str | None = None, follow: bool | None = None, timeout: float = 300) -> EndpointRecord:
    """Serve another version (or the alias's current one) at the same URL, with no failed request: start it
    beside the old one, check it generates, switch the router, let the old one finish its requests (for as long
    as one may run there), stop it. If the new version fails, it is stopped and the old one keeps serving;
    TesseraError says why. An update of an endpoint that another command is changing waits for it to end."""
    with _changing(name, wait=True):
        record = get(name)
        if not process_alive(record.router_pid, record.router_create_time) or record.status is EndpointStatus.STOPPED:
            raise TesseraError(f"endpoint {name} is {record.status.value}, not serving: start it with tessera serve")
        target = model_uri or record.model_uri
        registered, _, alias = registry.parse_model_uri(target)
        if follow is None:
            follow = alias is not None if model_uri else record.follow
        if follow and alias is None:
            raise ConfigError(f"{target}: only an alias (models:/<name>@<alias>) can be followed")
        version = str(registry.resolve(target).version)
        pinned = f"models:/{registered}/{version}"
        served_uri = target if follow else pinned
        old = record.backend
        live = old is not None and process_alive(old.pid, old.create_time)
        if live and old.model_uri == pinned:
            record.details = f"already serving version {version} ({served_uri}); nothing to do"
            record.model_uri, record.follow = served_uri, follow
            return save(record.model_copy(update={"status": EndpointStatus.READY}))
        record = load(name)
        if record.candidate is not None:  # left by an update that was killed
            _stop_process(record.candidate.pid, record.candidate.create_time, grace=10)
            record.candidate = None
        record.status = EndpointStatus.UPDATING
        try:
            candidate = _bring_up(record, pinned, version, timeout)
        except BaseException as exc:
            record = load(name)
            record.candidate, record.updated_at = None, now()
            record.status = EndpointStatus.READY
            kept = f"version {record.version} keeps serving" if live else "the endpoint has no working version"
            reason = str(exc) if isinstance(exc, (BackendFailed, TesseraError)) else f"interrupted ({type(exc).__name__})"
            record.details = f"update to {served_uri} (version {version}) failed: {reason}; {kept}"
            record.history.append(f"{now():%Y-%m-%d %H:%M:%S} update to version {version} failed, rolled back")
            save(record)
            if isinstance(exc, (BackendFailed, TesseraError)):
                raise TesseraError(f"endpoint {name}: {record.details} (log: {logs_dir(name)})") from None
            raise
        record = load(name)
        record.backend, record.candidate = candidate, None
        record.model_uri, record.follow, record.registered_model = served_uri, follow, registered
        previous, record.version = record.version, version
        record.status, record.updated_at = EndpointStatus.READY, now()
        record.details = f"updated from version {previous} to {version}"
        record.history.append(f"{now():%Y-%m-%d %H:%M:%S} serving version {version} ({served_uri}), was {previous}")
        save(record)  # the router switches on its next request
        if old is not None:
            try:
                _wait_drained(record, old)
            finally:  # interrupted or not, nothing refers to the old server any more
                _stop_process(old.pid, old.create_time)
        return record


def _stop_processes(record: EndpointRecord, grace: float = 30) -> None:
    """The router first (it finishes the requests under way), then the backends."""
    _stop_process(record.router_pid, record.router_create_time, grace)
    for backend in (record.candidate, record.backend):
        if backend is not None:
            _stop_process(backend.pid, backend.create_time, grace)


def stop(name: str, grace: float = 30) -> EndpointRecord:
    """Stop the endpoint's processes; the record stays (STOPPED) until the name is served again."""
    with _changing(name, wait=True):
        record = load(name)
        _stop_processes(record, grace)
        record.candidate, record.status, record.updated_at = None, EndpointStatus.STOPPED, now()
        record.details = None
        record.history.append(f"{now():%Y-%m-%d %H:%M:%S} stopped")
        return save(record)


def current(record: EndpointRecord) -> EndpointRecord:
    """The record with its status as the processes say now (not written back)."""
    status, details = record.status, record.details
    if status is EndpointStatus.STOPPED:
        return record
    in_progress = status in (EndpointStatus.STARTING, EndpointStatus.UPDATING) and _being_changed(record.name)
    router_ok = process_alive(record.router_pid, record.router_create_time)
    backend_ok = record.backend is not None and process_alive(record.backend.pid, record.backend.create_time)
    if in_progress:
        pass
    elif status is EndpointStatus.FAILED and not router_ok:
        pass
    elif not router_ok:
        status, details = EndpointStatus.FAILED, f"its router (pid {record.router_pid}) is not running; serve it again"
    elif record.backend is None:
        status, details = EndpointStatus.FAILED, "it has no model server (its start was interrupted); serve it again"
    elif not backend_ok:
        status = EndpointStatus.FAILED
        details = f"its model server (pid {record.backend.pid}, version {record.backend.version}) is not running; see {record.backend.log}"
    elif _http(record.local_url + "/readyz", record.api_key)[0] == 200:
        status = EndpointStatus.READY
    else:
        status, details = EndpointStatus.NOT_READY, f"/readyz does not answer 200; see {record.backend.log}"
    if status is not record.status or details != record.details:
        record = record.model_copy(update={"status": status, "details": details})
    return record


def get(name: str) -> EndpointRecord:
    return current(load(name))


def list_endpoints() -> list[EndpointRecord]:
    if not endpoints_dir().exists():
        return []
    records = [EndpointRecord.model_validate_json(p.read_text()) for p in endpoints_dir().glob("*.json")]
    return [current(r) for r in sorted(records, key=lambda r: r.name)]


def following(model_uri: str) -> list[EndpointRecord]:
    """The endpoints that follow an alias URI (the retrain flow updates them when it moves the alias)."""
    return [r for r in list_endpoints() if r.follow and r.model_uri == model_uri and r.status is not EndpointStatus.STOPPED]
