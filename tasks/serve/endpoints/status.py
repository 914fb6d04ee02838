"""An endpoint's status, checked when read: its processes must be alive and be the ones we started (same create
time), and /readyz must answer through the router; a record's status alone is not believed."""

from __future__ import annotations

from tasks.serve.endpoints.processes import http
from tasks.serve.endpoints.records import EndpointRecord, EndpointStatus, being_changed, endpoints_dir, load
from tessera.core.processes import process_alive


def current(record: EndpointRecord) -> EndpointRecord:
    """The record with its status as the processes say now (not written back)."""
    status, details = record.status, record.details
    if status is EndpointStatus.STOPPED:
        return record
    in_progress = status in (EndpointStatus.STARTING, EndpointStatus.UPDATING) and being_changed(record.name)
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
    elif http(record.local_url + "/readyz", record.api_key)[0] == 200:
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
