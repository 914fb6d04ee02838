"""Training-run records: status, timestamps and events, shared by every process through TESSERA_HOME.

The flow keeps them current through Prefect state hooks, so a run started from the SDK, the CLI, the
Prefect UI or a schedule is visible to `fm.get`/`fm.list` from any process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
from enum import Enum
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from tessera.core.catalog import ResolvedModel
from tessera.core.checkpoints import resumable_note
from tessera.core.config import RunConfig, RunParameters, new_run_name
from tessera.core.errors import TesseraError
from tessera.core.paths import file_lock, runs_dir, write_atomic
from tessera.core.processes import CREATE_TIME_TOLERANCE, create_time, process_alive, redeliver_lost_sigterms
from tessera.core.weights import StartingWeights


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
    # the run's process is `pid` only while a process of that pid started at `pid_create_time` (psutil's
    # create_time) runs on `host`: a pid alone may have been reused. Both None in records from before they existed.
    pid_create_time: float | None = None
    host: str | None = None
    prefect_flow_run_id: str | None = None
    work_pool: str | None = None  # set when a worker of this Prefect work pool executes the run (TESSERA_WORK_POOL)
    resolved_model: ResolvedModel | None = None  # the base model as the one check of the run's inputs found it
    resolved_weights: StartingWeights | None = None  # and custom_weights_path, resolved and checked by it
    experiment_id: str | None = None
    run_id: str | None = None
    registered_version: str | None = None
    checkpoint_dir: str | None = None  # where the train stage saves the run's checkpoints (tessera.core.checkpoints)
    details: str | None = None


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def run_dir(name: str) -> Path:
    return runs_dir() / name


def job_file(name: str) -> Path:
    """The run's training job (tessera.core.training.TrainJob), written by its train stage for every node's workers."""
    return run_dir(name) / "train_job.json"


def _record_file(name: str) -> Path:
    return run_dir(name) / "run.json"


def save(record: RunRecord) -> RunRecord:
    """Write atomically: readers in other processes never see half a record."""
    write_atomic(_record_file(record.config.name), record.model_dump_json(indent=2))
    return record


def exists(name: str) -> bool:
    return _record_file(name).exists()


def load(name: str) -> RunRecord:
    path = _record_file(name)
    if not exists(name):
        raise TesseraError(f"no training run named {name!r} (runs live in {runs_dir()})")
    try:
        return RunRecord.model_validate_json(path.read_text())
    except ValueError as exc:
        raise TesseraError(f"run {name}: unreadable record {path}: {str(exc).splitlines()[0]}") from None


def _record_lock(name: str):
    return file_lock(run_dir(name) / ".run.lock")


def update(name: str, only_if: Callable[[RunRecord], bool] | None = None, **fields) -> RunRecord:
    """Change fields of a record, read and written under the record's lock so that concurrent writers (the flow's
    hooks, fm.cancel, a reader marking a dead run) never lose each other's changes. With `only_if`, only when it
    holds for the record as it is now; the record is returned either way."""
    with _record_lock(name):
        record = load(name)
        if only_if is not None and not only_if(record):
            return record
        return save(record.model_copy(update=fields))


def this_host() -> str:
    return socket.gethostname()


def process_identity(pid: int) -> dict:
    """The fields that name a run's process beyond its pid: its start time and this host."""
    return {"pid": pid, "pid_create_time": create_time(pid), "host": this_host()}


def on_other_host(record: RunRecord) -> bool:
    """A run recorded by another machine sharing this TESSERA_HOME: nothing here can tell whether it lives."""
    return record.host is not None and record.host != this_host()


def process_gone(record: RunRecord) -> bool:
    """Whether the run's recorded process has certainly ended: never for a run on another host or with no pid."""
    if not record.pid or on_other_host(record):
        return False
    if record.pid_create_time is not None:
        return not process_alive(record.pid, record.pid_create_time)
    if not process_alive(record.pid):  # a record from before start times were kept: the pid, and what else is known
        return True
    if record.started_at is not None:  # a process started after the run was already running is not the run's
        return create_time(record.pid) > record.started_at.timestamp() + CREATE_TIME_TOLERANCE
    return False


class UnreadableRecord(BaseModel):
    """A run whose record cannot be read (cut short by a full disk, written by an older version): listed UNKNOWN with
    the reason, so that it never hides the other runs."""

    name: str
    created_at: dt.datetime
    reason: str


def list_records() -> list[RunRecord | UnreadableRecord]:
    """Every run's record, newest first."""
    if not runs_dir().exists():
        return []
    records = []
    for path in runs_dir().glob("*/run.json"):
        try:
            records.append(RunRecord.model_validate_json(path.read_text()))
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            modified = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc) if path.exists() else now()
            records.append(UnreadableRecord(name=path.parent.name, created_at=modified, reason=f"unreadable record {path}: {reason}"))
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
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line being written right now (or cut by a crash): it is read whole next time
            continue
    return events


# Prefect state hooks: (flow, flow_run, state). Runs started outside the SDK get a record here.

def flow_run_name(parameters: dict, flow_run_id) -> str:
    """The run's name: the one the SDK gave it, else (a run from the Prefect UI, a schedule, an event) a model-based
    name as the SDK would give, never Prefect's random flow-run name. Derived from the flow run's id, so the state
    hooks and the flow itself agree on it; a two-part register_to names the registered model after it."""
    return parameters.get("run_name") or new_run_name(str(parameters.get("model") or "run"), str(flow_run_id).replace("-", "")[-6:])


def _run_name(flow_run) -> str:
    return flow_run_name(flow_run.parameters, flow_run.id)


def _pinned(recorded, given) -> bool:
    """A table the record pinned to the version read at creation (`main.sales.chats@v3`) is the table as given."""
    return isinstance(recorded, str) and isinstance(given, str) and "@" not in given and bool(
        re.fullmatch(re.escape(given) + r"@v\d+", recorded)
    )


def parameter_differences(config: RunConfig, flow_parameters: dict) -> list[str]:
    """How a flow run's parameters differ from a record's configuration (its name and creator aside), one
    `field: the record has X, this flow run Y` per difference; empty when they are the same run."""
    from tessera.core.config import build_run_config

    params = {k: v for k, v in flow_parameters.items() if k != "run_name"}
    wanted = build_run_config(name=config.name, **params).parameters
    have = config.parameters
    diffs = []
    for key in RunParameters.model_fields:
        a, b = have.get(key), wanted.get(key)
        if a == b or (key in ("train_data_path", "eval_data_path") and _pinned(a, b)):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: the record has {a.get(k)!r}, this flow run {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            diffs.append(f"{key}: the record has {a!r}, this flow run {b!r}")
    return diffs


def ensure_record(name: str, flow_parameters: dict) -> RunRecord:
    """The run's record. An existing one is adopted only when its configuration is this flow run's parameters;
    otherwise a TesseraError says which differ. A run started outside the SDK (Prefect UI, schedule, event) gets
    one here, made from its own parameters."""
    from tessera.core.config import build_run_config

    with _record_lock(name):
        if _record_file(name).exists():
            record = load(name)
            diffs = parameter_differences(record.config, flow_parameters)
            if diffs:
                raise TesseraError(
                    f"a run named {name!r} already exists with other parameters, so this flow run does not adopt it: "
                    + "; ".join(diffs)
                    + ". Start it under another run_name, or with none (it then gets a new name and a record of its own)"
                )
            return record
        params = {k: v for k, v in flow_parameters.items() if k != "run_name"}
        return save(RunRecord(config=build_run_config(name=name, **params), created_at=now()))


def _owns(record: RunRecord, flow_run) -> bool:
    """Whether this flow run is the record's: the one that adopted it, or (before any adopted it) one of the same
    parameters. A flow run refused by ensure_record never writes to the other run's record."""
    if record.prefect_flow_run_id is not None:
        return record.prefect_flow_run_id == str(flow_run.id)
    try:
        return not parameter_differences(record.config, flow_run.parameters)
    except TesseraError:
        return False


def _own_record(flow_run) -> RunRecord | None:
    name = _run_name(flow_run)
    if not _record_file(name).exists():
        return None
    record = load(name)
    return record if _owns(record, flow_run) else None


def cancelled(record: RunRecord) -> bool:
    """Whether a cancel stopped the run or is stopping it: its flow run must not (re)start it, only a resume may."""
    return record.status in (RunStatus.TERMINATING, RunStatus.STOPPED)


def crashed_too_often(record: RunRecord, run_count: int) -> str | None:
    """Why a flow run Prefect scheduled again after crashes (automations.yaml) must not run once more: it has run
    1 + training_config train_retries times already. None when it may."""
    retries = record.config.training_config.train_retries
    if run_count <= 1 + retries:
        return None
    return (f"run {record.config.name} crashed {run_count - 1} time(s): not run again (training_config train_retries "
            f"{retries})" + resumable_note(record.checkpoint_dir, record.config.name))


def on_running(flow, flow_run, state) -> None:
    redeliver_lost_sigterms()  # the flow's process, here or on a worker: a cancel's SIGTERM is never lost to a finalizer
    name = _run_name(flow_run)
    try:
        ensure_record(name, flow_run.parameters)
    except TesseraError:  # not adopted: the flow fails with the reason, and the other run's record stays as it is
        return
    record = update(name, only_if=lambda r: not cancelled(r), status=RunStatus.RUNNING, started_at=now(),
                    prefect_flow_run_id=str(flow_run.id), **process_identity(os.getpid()))
    if record.status is RunStatus.RUNNING:  # else cancelled before it started: the flow ends Cancelled at once
        append_event(name, "run", f"running (Prefect flow run {flow_run.name}, {flow_run.id})")


def on_completion(flow, flow_run, state) -> None:
    record = _own_record(flow_run)
    if record is None:
        return
    # a cancel still stopping the run (TERMINATING) may find it completed: that is what happened
    record = update(record.config.name, only_if=lambda r: r.status is not RunStatus.STOPPED,
                    status=RunStatus.COMPLETED, completed_at=now())
    if record.status is RunStatus.COMPLETED:
        append_event(record.config.name, "run", "completed")


def stop(name: str, details: str) -> None:
    """End a run STOPPED (a cancel), unless it completed meanwhile; the event once."""
    before = load(name)
    details += resumable_note(before.checkpoint_dir, name)
    before = before.status
    record = update(name, only_if=lambda r: r.status is not RunStatus.COMPLETED and r.status is not RunStatus.STOPPED,
                    status=RunStatus.STOPPED, completed_at=now(), details=details)
    if before is not RunStatus.STOPPED and record.status is RunStatus.STOPPED:
        append_event(name, "run", f"stopped: {details}")


def _cancelling_in_prefect(flow_run_id) -> bool:
    """Whether Prefect now has the flow run cancelling or cancelled (a cancel from the UI whose kill reached the
    flow as a crash before the worker ran the on_cancellation hooks)."""
    try:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        return state is not None and (state.is_cancelling() or state.is_cancelled())
    except Exception:
        return False


def show_cancelled(flow_run_id) -> None:
    """Prefect reports the kill of a cancel it did not ask for (fm.cancel's SIGTERM to a run's own process) as a
    crash, and a flow killed before it could say anything stays Running: set the flow run Cancelled, so that its UI
    says what happened. Prefect's own cancels are left to it."""
    from prefect import get_client
    from prefect.states import Cancelled

    if _cancelling_in_prefect(flow_run_id):
        return
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelled(message="cancelled by the user"), force=True)


def on_failure(flow, flow_run, state) -> None:
    record = _own_record(flow_run)
    if record is None:
        return
    if cancelled(record):  # the kill of a cancel, not a failure
        show_cancelled(flow_run.id)
        return
    name = record.config.name
    if _cancelling_in_prefect(flow_run.id):
        stop(name, "cancelled from Prefect")
        return
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
    if "resumable from" not in reason:
        reason += resumable_note(record.checkpoint_dir, name)
    record = update(name, only_if=lambda r: not cancelled(r), status=RunStatus.FAILED, completed_at=now(), details=reason)
    if record.status is RunStatus.FAILED:
        append_event(name, "run", f"failed: {reason}")


def on_cancellation(flow, flow_run, state) -> None:
    """A cancel from the Prefect UI (or API): the run ends STOPPED, not FAILED. Prefect runs this hook in the flow's
    process, or in the worker's after it stopped that process; a FAILED written meanwhile by the crash is replaced."""
    record = _own_record(flow_run)
    if record is None:
        return
    message = getattr(state, "message", None)
    stop(record.config.name, "cancelled from Prefect" + (f" ({message})" if message else ""))
