"""An endpoint's lifecycle: `serve` starts its router and first backend, `update` replaces the version with a
health-checked rollout (rolled back if the new one fails), `stop` stops its processes and keeps the record."""

from __future__ import annotations

import os
import sys

from tasks.serve.endpoints.backends import BackendFailed, bring_up, wait_drained
from tasks.serve.endpoints.processes import start_router, stop_process
from tasks.serve.endpoints.records import (
    EndpointRecord, EndpointStatus, changing, check_name, default_name, load, logs_dir, now, record_file, save,
)
from tasks.serve.endpoints.status import get
from tessera.core.processes import free_port, port_is_free
from tessera.core import registry
from tessera.core.errors import ConfigError, TesseraError
from tessera.core.processes import process_alive

DEFAULT_PORT = 3000
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
    with changing(name):
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
            port = DEFAULT_PORT if port_is_free(host, DEFAULT_PORT) else free_port(host)
        elif not port_is_free(host, port):
            raise TesseraError(f"port {port} on {host} is in use; pick another --port")
        pinned = f"models:/{registered}/{version}"
        served_uri = model_uri if follow else pinned
        record = save(EndpointRecord(
            name=name, model_uri=served_uri, follow=follow, registered_model=registered, host=host, port=port,
            url=f"http://{host}:{port}", api_key=api_key, created_at=now(), updated_at=now(),
        ))
        os.chmod(record_file(name), 0o600)
        try:
            start_router(record)
            record.backend, record.candidate = bring_up(record, pinned, version, timeout), None
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
    with changing(name, wait=True):
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
            stop_process(record.candidate.pid, record.candidate.create_time, grace=10)
            record.candidate = None
        record.status = EndpointStatus.UPDATING
        try:
            candidate = bring_up(record, pinned, version, timeout)
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
                wait_drained(record, old)
            finally:  # interrupted or not, nothing refers to the old server any more
                stop_process(old.pid, old.create_time)
        return record


def _stop_processes(record: EndpointRecord, grace: float = 30) -> None:
    """The router first (it finishes the requests under way), then the backends."""
    stop_process(record.router_pid, record.router_create_time, grace)
    for backend in (record.candidate, record.backend):
        if backend is not None:
            stop_process(backend.pid, backend.create_time, grace)


def stop(name: str, grace: float = 30) -> EndpointRecord:
    """Stop the endpoint's processes; the record stays (STOPPED) until the name is served again."""
    with changing(name, wait=True):
        record = load(name)
        _stop_processes(record, grace)
        record.candidate, record.status, record.updated_at = None, EndpointStatus.STOPPED, now()
        record.details = None
        record.history.append(f"{now():%Y-%m-%d %H:%M:%S} stopped")
        return save(record)
