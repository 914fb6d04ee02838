"""Training-run records: status, timestamps and events, shared by every process through TESSERA_HOME.

The flow keeps them current through Prefect state hooks, so a run started from the SDK, the CLI, the
Prefect UI or a schedule is visible to `fm.get`/`fm.list` from any process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from enum import Enum
from pathlib import Path

from pydantic import BaseModel

from tessera.config import RunConfig, new_run_name
from tessera.errors import TesseraError
from tessera.paths import runs_dir


class RunStatus(str, Enum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    TERMINATING = "TERMINATING"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.STOPPED, RunStatus.FAILED)


class RunRecord(BaseModel):
    config: RunConfig
    status: RunStatus = RunStatus.PENDING
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    estimated_end_time: dt.datetime | None = None
    pid: int | None = None
    prefect_flow_run_id: str | None = None
    experiment_id: str | None = None
    run_id: str | None = None
    registered_version: str | None = None
    details: str | None = None


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def run_dir(name: str) -> Path:
    return runs_dir() / name


def _record_file(name: str) -> Path:
    return run_dir(name) / "run.json"


def save(record: RunRecord) -> RunRecord:
    """Write atomically: readers in other processes never see half a record."""
    path = _record_file(record.config.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".run-")
    with os.fdopen(fd, "w") as f:
        f.write(record.model_dump_json(indent=2))
    os.replace(tmp, path)
    return record


def load(name: str) -> RunRecord:
    path = _record_file(name)
    if not path.exists():
        raise TesseraError(f"no training run named {name!r} (runs live in {runs_dir()})")
    return RunRecord.model_validate_json(path.read_text())


def update(name: str, **fields) -> RunRecord:
    return save(load(name).model_copy(update=fields))


def list_records() -> list[RunRecord]:
    if not runs_dir().exists():
        return []
    records = [RunRecord.model_validate_json(p.read_text()) for p in runs_dir().glob("*/run.json")]
    return sorted(records, key=lambda r: r.created_at, reverse=True)


def append_event(name: str, stage: str, message: str) -> None:
    path = run_dir(name) / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": now().isoformat(), "stage": stage, "message": message}) + "\n")


def read_events(name: str) -> list[dict]:
    path = run_dir(name) / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Prefect state hooks: (flow, flow_run, state). Runs started outside the SDK get a record here.

def flow_run_name(parameters: dict, flow_run_id) -> str:
    """The run's name: the one the SDK gave it, else (a run from the Prefect UI, a schedule, an event) a model-based
    name as the SDK would give, never Prefect's random flow-run name. Derived from the flow run's id, so the state
    hooks and the flow itself agree on it; a two-part register_to names the registered model after it."""
    return parameters.get("run_name") or new_run_name(str(parameters.get("model") or "run"), str(flow_run_id).replace("-", "")[-6:])


def _run_name(flow_run) -> str:
    return flow_run_name(flow_run.parameters, flow_run.id)


def ensure_record(name: str, flow_parameters: dict) -> RunRecord:
    """The run's record; a run started outside the SDK (Prefect UI, schedule, event) gets one here."""
    if _record_file(name).exists():
        return load(name)
    from tessera.config import build_run_config

    params = {k: v for k, v in flow_parameters.items() if k != "run_name"}
    return save(RunRecord(config=build_run_config(name=name, **params), created_at=now()))


def on_running(flow, flow_run, state) -> None:
    name = _run_name(flow_run)
    ensure_record(name, flow_run.parameters)
    update(name, status=RunStatus.RUNNING, started_at=now(), prefect_flow_run_id=str(flow_run.id), pid=os.getpid())
    append_event(name, "run", f"running (Prefect flow run {flow_run.name}, {flow_run.id})")


def on_completion(flow, flow_run, state) -> None:
    name = _run_name(flow_run)
    update(name, status=RunStatus.COMPLETED, completed_at=now())
    append_event(name, "run", "completed")


def on_failure(flow, flow_run, state) -> None:
    name = _run_name(flow_run)
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result could not be read back: fall back to Prefect's message
        exc = None
    if isinstance(exc, TesseraError):
        reason = str(exc)
    elif isinstance(exc, BaseException):
        reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = state.message or "failed"
    if _record_file(name).exists() and load(name).status not in (RunStatus.TERMINATING, RunStatus.STOPPED):  # not a cancel
        update(name, status=RunStatus.FAILED, completed_at=now(), details=reason)
        append_event(name, "run", f"failed: {reason}")
