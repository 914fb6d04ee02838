"""The managed service's Python SDK, self-hosted: `from tessera import foundation_model as fm`.

fm.create() checks what it can at once (names, model, context length, data path), records the run,
and starts the Prefect flow in a detached process: the run survives the caller, and any process
sees its status through the run records in TESSERA_HOME.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pydantic import BaseModel

from tessera import runs
from tessera.catalog import ModelSpec, catalog
from tessera.config import RunConfig, RunParameters, build_run_config
from tessera.errors import TesseraError
from tessera.paths import apply_engine_defaults, tessera_home
from tessera.runs import RunRecord, RunStatus
from tessera.sources import check_inputs


class TrainingRun(BaseModel):
    name: str
    status: RunStatus
    created_by: str
    model: str
    train_data_path: str
    register_to: str
    task_type: str
    eval_data_path: str | None = None
    eval_prompts: list[str] | None = None
    custom_weights_path: str | None = None
    training_duration: str
    learning_rate: float | None = None
    context_length: int | None = None
    data_prep_cluster_id: str | None = None
    training_config: dict
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    estimated_end_time: dt.datetime | None = None
    experiment_id: str | None = None
    run_id: str | None = None
    save_folder: str
    registered_model_version: str | None = None
    details: str | None = None

    @classmethod
    def from_record(cls, record: RunRecord) -> TrainingRun:
        c: RunConfig = record.config
        return cls(
            **c.model_dump(include={
                "created_by", "model", "train_data_path", "register_to", "eval_data_path", "eval_prompts",
                "custom_weights_path", "training_duration", "learning_rate", "context_length", "data_prep_cluster_id",
                "training_config",
            }),
            name=c.name, task_type=c.task_type.value, status=record.status, created_at=record.created_at,
            started_at=record.started_at, completed_at=record.completed_at,
            estimated_end_time=record.estimated_end_time, experiment_id=record.experiment_id, run_id=record.run_id,
            save_folder=str(runs.run_dir(c.name)), registered_model_version=record.registered_version,
            details=record.details,
        )

    def refresh(self) -> TrainingRun:
        return get(self.name)

    def cancel(self) -> None:
        cancel(self.name)

    def get_events(self) -> list[dict]:
        return get_events(self.name)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _current(record: RunRecord) -> RunRecord:
    """A run whose process died without saying so (killed, machine restarted) is FAILED, not RUNNING forever."""
    if not record.status.finished and record.pid and not _alive(record.pid):
        record = runs.update(
            record.config.name, status=RunStatus.FAILED, completed_at=runs.now(),
            details=f"the run's process ({record.pid}) exited unexpectedly; see {runs.run_dir(record.config.name) / 'run.log'}",
        )
    return record


def create(
    model: str,
    train_data_path: str,
    register_to: str,
    *,
    task_type: str = "CHAT_COMPLETION",
    eval_data_path: str | None = None,
    eval_prompts: list[str] | None = None,
    custom_weights_path: str | None = None,
    training_duration: str = "1ep",
    learning_rate: float | None = None,
    context_length: int | None = None,
    validate_inputs: bool = True,
    data_prep_cluster_id: str | None = None,
    experiment_path: str | None = None,
    training_config: dict | str | None = None,
) -> TrainingRun:
    """Start a fine-tuning run in the background and return at once; follow it with get()/get_events().

    The parameters are the managed service's (tessera.config.RunParameters describes each), plus
    `training_config`: Tessera's training settings as a dict or the path of a YAML file (TrainingSettings).
    With `validate_inputs` (the default) the model, context length and data paths are checked here, so a bad
    input fails this call; without it the run checks them first, and fails instead.
    """
    apply_engine_defaults()
    config = build_run_config(**{k: v for k, v in locals().items() if k in RunParameters.model_fields})
    if validate_inputs:  # as the managed service did: refuse bad inputs before anything starts
        config = check_inputs(config)
    runs.save(RunRecord(config=config, created_at=runs.now()))
    log = open(runs.run_dir(config.name) / "run.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "tessera.sdk", config.name],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, TESSERA_HOME=str(tessera_home())),
    )
    runs.update(config.name, pid=process.pid)
    runs.append_event(config.name, "run", f"created; log: {runs.run_dir(config.name) / 'run.log'}")
    return get(config.name)


def get(run_or_name: TrainingRun | str) -> TrainingRun:
    name = run_or_name.name if isinstance(run_or_name, TrainingRun) else run_or_name
    return TrainingRun.from_record(_current(runs.load(name)))


def list(statuses: list[str] | None = None, limit: int | None = None) -> list[TrainingRun]:  # noqa: A001 - the SDK's name
    found = [TrainingRun.from_record(_current(r)) for r in runs.list_records()]
    if statuses:
        found = [r for r in found if r.status.value in {s.upper() for s in statuses}]
    return found[:limit] if limit else found


def _stop(pid: int, grace: float = 60) -> None:
    """SIGTERM the run's process, which Prefect turns into a crash of the flow: the train stage then stops
    torchrun and its workers, and Prefect its own API server. Whatever is left after `grace` is killed."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # fm.create started it as the leader of its own process group
    except ProcessLookupError:
        pass


def cancel(run_or_name: TrainingRun | str) -> None:
    """Stop a run and everything it started (the flow, torchrun and its workers); nothing is registered."""
    run = get(run_or_name)
    if run.status.finished:
        raise TesseraError(f"run {run.name} already finished ({run.status.value})")
    record = runs.update(run.name, status=RunStatus.TERMINATING)
    if record.pid and _alive(record.pid):
        _stop(record.pid)
    runs.update(run.name, status=RunStatus.STOPPED, completed_at=runs.now(), details="cancelled by the user")
    runs.append_event(run.name, "run", "stopped: cancelled by the user")


def get_events(run_or_name: TrainingRun | str) -> list[dict]:
    name = run_or_name.name if isinstance(run_or_name, TrainingRun) else run_or_name
    runs.load(name)
    return runs.read_events(name)


def validate_data(
    train_data_path: str,
    *,
    model: str,
    task_type: str = "CHAT_COMPLETION",
    context_length: int | None = None,
    training_duration: str = "1ep",
    data_prep_cluster_id: str | None = None,
):
    """The data report (errors, token statistics, billed-token estimate, warnings) without training.

    The prepared data is cached, so a run on the same data and model afterwards skips tokenization.
    """
    from tasks.validate import report_for

    apply_engine_defaults()
    config = build_run_config(
        name="validate", model=model, train_data_path=train_data_path, register_to="tessera.validate",
        task_type=task_type, context_length=context_length, training_duration=training_duration,
        data_prep_cluster_id=data_prep_cluster_id,
    )
    return report_for(check_inputs(config))


def get_models() -> list[ModelSpec]:
    return [m for m in catalog().values()]


def _execute(name: str) -> int:
    """Body of the detached process fm.create starts: run the flow for a recorded run."""
    apply_engine_defaults()
    from flows.finetune import finetune

    try:
        finetune(run_name=name, **runs.load(name).config.parameters)
    except BaseException as exc:  # the flow's hooks recorded the reason; make sure nothing stays RUNNING
        record = runs.load(name)
        if not (record.status.finished or record.status is RunStatus.TERMINATING):
            runs.update(name, status=RunStatus.FAILED, completed_at=runs.now(), details=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_execute(sys.argv[1]))
