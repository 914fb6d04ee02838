"""The managed service's Python SDK, self-hosted: `from tessera import foundation_model as fm`.

fm.create() checks what it can at once (names, model, context length, data path), records the run, and starts the
Prefect flow: with TESSERA_WORK_POOL set, as a run of the `finetune` deployment of that work pool, which one of its
workers picks up (QUEUED until then); otherwise in a detached process here. Either way the run survives the caller,
Prefect records it (the server at PREFECT_API_URL, else this home's embedded one: tessera.core.prefect_server), and
any process sees its status through the run records in TESSERA_HOME (and Prefect's flow-run state, for a run a
worker executes).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tessera.core import runs
from tessera.core.catalog import ModelSpec, catalog
from tessera.core.checkpoints import CheckpointInfo, list_checkpoints, resumable_note
from tessera.core.config import RunConfig, RunParameters, build_run_config
from tessera.core.errors import TesseraError
from tessera.core.paths import apply_engine_defaults, tessera_home
from tessera.core.prefect_server import use_prefect_api
from tessera.core.processes import redeliver_lost_sigterms, skip_final_collection, stop_tree
from tessera.core.runs import RunRecord, RunStatus
from tessera.core.run_plan import resolve_run


class TrainingRun(RunConfig):
    """A run as the managed service's SDK returns it: the run's configuration (every parameter, its name and who
    started it, from the one definition) and where it stands."""

    status: RunStatus
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
        return cls(
            **record.config.model_dump(), status=record.status, created_at=record.created_at,
            started_at=record.started_at, completed_at=record.completed_at,
            estimated_end_time=record.estimated_end_time, experiment_id=record.experiment_id, run_id=record.run_id,
            save_folder=record.checkpoint_dir or str(runs.run_dir(record.config.name)),
            registered_model_version=record.registered_version, details=record.details,
        )

    @classmethod
    def unknown(cls, record: runs.UnreadableRecord) -> TrainingRun:
        """A run whose record cannot be read: its name, UNKNOWN, and why."""
        return cls.model_construct(
            name=record.name, status=RunStatus.UNKNOWN, created_at=record.created_at, details=record.reason,
            model="", train_data_path="", register_to="", save_folder=str(runs.run_dir(record.name)),
        )

    def refresh(self) -> TrainingRun:
        return get(self.name)

    def cancel(self) -> None:
        cancel(self.name)

    def get_events(self) -> list[dict]:
        return get_events(self.name)


def _current(record: RunRecord) -> RunRecord:
    """A run whose process died without saying so (killed, machine restarted) is FAILED, not RUNNING forever; one a
    cancel was stopping is STOPPED. Liveness is the recorded process (pid and start time), never a bare pid; a run
    recorded by another host is left as it is (nothing here can tell). A run submitted to a deployment (no process
    of ours) is what Prefect says it is."""
    if not record.status.finished and record.pid is None and record.prefect_flow_run_id and record.work_pool:
        return _prefect_state(record)
    if record.status.finished or not runs.process_gone(record):
        return record
    name, pid, create_time = record.config.name, record.pid, record.pid_create_time

    def same_process_unfinished(r: RunRecord) -> bool:  # re-checked under the record's lock: nobody wrote meanwhile
        return not r.status.finished and r.pid == pid and r.pid_create_time == create_time

    if record.status is RunStatus.TERMINATING:
        return runs.update(name, only_if=same_process_unfinished, status=RunStatus.STOPPED, completed_at=runs.now(),
                           details=record.details or "cancelled")
    return runs.update(
        name, only_if=same_process_unfinished, status=RunStatus.FAILED, completed_at=runs.now(),
        details=f"the run's process ({pid}) exited unexpectedly; see {runs.run_dir(name) / 'run.log'}"
        + resumable_note(record.checkpoint_dir, name),
    )


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
    serve_to: str | None = None,
) -> TrainingRun:
    """Start a fine-tuning run in the background and return at once; follow it with get()/get_events().

    The parameters are the managed service's (tessera.core.config.RunParameters describes each), plus
    `training_config`: Tessera's training settings as a dict or the path of a YAML file (TrainingSettings), and
    `serve_to`: a named endpoint that serves the new version once registered (started, or updated in place).
    With `validate_inputs` (the default) the model, context length and data paths are checked here, so a bad
    input fails this call; without it the run checks them first, and fails instead.
    """
    apply_engine_defaults()
    config = build_run_config(**{k: v for k, v in locals().items() if k in RunParameters.model_fields})
    resolved = None
    if validate_inputs:  # as the managed service did: refuse bad inputs before anything starts (and only here)
        resolved = resolve_run(config)
        config = resolved.config
    use_prefect_api()  # the server that records it, started here (once per home) so the run's process finds it
    runs.save(RunRecord(config=config, created_at=runs.now(), resolved_model=resolved and resolved.model,
                        resolved_weights=resolved and resolved.weights))
    runs.append_event(config.name, "run", f"created; log: {runs.run_dir(config.name) / 'run.log'}")
    return _start(config)


def _start(config: RunConfig) -> TrainingRun:
    """Run the recorded run's flow: on a worker of TESSERA_WORK_POOL's pool, else in a detached process here."""
    if os.environ.get("TESSERA_WORK_POOL"):
        return _submit(config, os.environ["TESSERA_WORK_POOL"])
    log = open(runs.run_dir(config.name) / "run.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "tessera.sdk", config.name],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, TESSERA_HOME=str(tessera_home())),
    )
    runs.update(config.name, **runs.process_identity(process.pid))
    return get(config.name)


def resume(run_or_name: TrainingRun | str) -> TrainingRun:
    """Continue a FAILED or STOPPED run from its last checkpoint, in the same MLflow run, on the data version it
    pinned when it was created (no newer data); a run with no checkpoint starts its training over. The only way a
    STOPPED run is reopened. A run with no record here (it ran on another machine sharing the tracking server) is
    looked up in MLflow by its name."""
    name = run_or_name.name if isinstance(run_or_name, TrainingRun) else run_or_name
    if not runs.exists(name):
        _record_from_tracking(name)
    run = get(name)
    if run.status not in (RunStatus.FAILED, RunStatus.STOPPED):
        raise TesseraError(f"run {run.name} is {run.status.value}: only a FAILED or STOPPED run can be resumed")
    record = runs.load(run.name)
    if runs.on_other_host(record) and record.work_pool is None:
        raise TesseraError(f"run {run.name} ran on host {record.host}: resume it there (its checkpoints are in {run.save_folder})")
    use_prefect_api()
    found = list_checkpoints(record.checkpoint_dir)
    runs.update(run.name, status=RunStatus.PENDING, completed_at=None, details=None, pid=None, pid_create_time=None,
                prefect_flow_run_id=None)
    if found:
        where = f"the checkpoint at {found[-1].label}"
    else:  # a run recorded here from MLflow has not looked for its checkpoints yet: its train stage does
        where = "the start of training (no checkpoint)" if record.checkpoint_dir else "its newest checkpoint, if its MLflow run keeps one"
    runs.append_event(run.name, "run", f"reopened: it continues from {where}")
    return _start(record.config)


def _record_from_tracking(name: str) -> None:
    """The record of a run that has none here, made from its MLflow run (found by its name tag on the tracking server
    this host shares with the one that trained it), so that it resumes here: its configuration (tables pinned to the
    versions it read), its MLflow run, FAILED. Its checkpoints come from that MLflow run's artifacts (the train
    stage's CheckpointMirror) or from a checkpoint_dir both hosts reach; its data is prepared again here (a resume
    refuses other data). A run still heard from (tessera.core.tracking.heartbeat) or completed is refused."""
    import mlflow

    from tessera.core import tracking

    client = tracking.mlflow_client()
    found = tracking.find_run(client, name)
    if found is None:
        raise TesseraError(f"no training run named {name!r} here (runs live in {runs.runs_dir()}) nor in MLflow at "
                           f"{client.tracking_uri}")
    info, host = found.info, found.data.tags.get(tracking.HOST_TAG, "another host")
    where = f"on {host} (MLflow run {info.run_id})"
    if info.status == "FINISHED":
        raise TesseraError(f"run {name} completed {where}: there is nothing to resume")
    silent = tracking.silent_for(found)
    if info.status == "RUNNING" and silent is not None and silent < 3 * tracking.heartbeat_s():
        raise TesseraError(f"run {name} is still training {where}, last heard from {silent:.0f} s ago: cancel it "
                           "there, or resume it here once it has stopped")
    try:
        config = RunConfig.model_validate(mlflow.artifacts.load_dict(f"runs:/{info.run_id}/{tracking.RUN_CONFIG_ARTIFACT}"))
    except Exception:  # noqa: BLE001 - started by a Tessera that did not keep it, or killed before it did
        raise TesseraError(f"run {name} ran {where}, which keeps no {tracking.RUN_CONFIG_ARTIFACT}: resume it on "
                           f"{host}") from None
    started = dt.datetime.fromtimestamp(info.start_time / 1000, dt.timezone.utc)
    # FAILED: what resume reopens (it then clears the status, the details and the process at once)
    runs.save(RunRecord(config=config, status=RunStatus.FAILED, created_at=started, experiment_id=info.experiment_id,
                        run_id=info.run_id))
    runs.append_event(name, "run", f"recorded here from its MLflow run {info.run_id}: it ran on {host}")


def delete(run_or_name: TrainingRun | str) -> list[Path]:
    """Remove a finished run's local files: its folder (record, events, log, final model) and its checkpoints. What
    MLflow keeps of it (the run, its metrics, registered versions) stays. A run that may still be going is refused.
    Returns what was removed."""
    import shutil

    name = run_or_name.name if isinstance(run_or_name, TrainingRun) else run_or_name
    try:
        record = _current(runs.load(name))
    except TesseraError:
        if not runs.run_dir(name).is_dir():
            raise
        record = None  # an unreadable record: its folder is all there is
    if record is not None and not record.status.finished:
        raise TesseraError(f"run {name} is {record.status.value}: cancel it first (tessera runs cancel {name})")
    removed = [Path(p) for p in (record and record.checkpoint_dir, runs.run_dir(name)) if p and Path(p).is_dir()]
    for path in removed:
        shutil.rmtree(path)
    return removed


def prune_prepared_cache() -> tuple[list[Path], list[Path]]:
    """Remove the prepared data no run may still need: a run still going, or a FAILED or STOPPED one with a checkpoint
    (a resume reads the prepared rows it started with). Returns (removed, kept)."""
    import json
    import shutil

    from tessera.core.checkpoints import latest
    from tessera.core.paths import prepared_dir

    needed = set()
    for record in runs.list_records():
        if isinstance(record, runs.UnreadableRecord):  # nothing tells what it needs: keep everything it may
            needed |= {str(p) for p in prepared_dir().glob("*")}
            continue
        record = _current(record)
        resumable = record.status in (RunStatus.FAILED, RunStatus.STOPPED) and latest(record.checkpoint_dir)
        job = runs.job_file(record.config.name)
        if (not record.status.finished or resumable) and job.exists():
            spec = json.loads(job.read_text())
            needed |= {spec["prepared_path"], spec.get("eval_prepared_path")}
        elif not record.status.finished:  # not trained yet: its data may be being prepared now
            needed |= {str(p) for p in prepared_dir().glob("*")}
    removed, kept = [], []
    for entry in sorted(prepared_dir().glob("*")) if prepared_dir().is_dir() else []:
        if str(entry) in needed:
            kept.append(entry)
        else:
            shutil.rmtree(entry)
            removed.append(entry)
    return removed, kept


def get_checkpoints(run_or_name: TrainingRun | str) -> list[CheckpointInfo]:
    """The run's complete checkpoints, oldest first: step, epoch, tokens seen, train and eval loss, path."""
    name = run_or_name.name if isinstance(run_or_name, TrainingRun) else run_or_name
    return list_checkpoints(runs.load(name).checkpoint_dir)


# a SIGTERM that reaches the flow while Python runs a finalizer is lost (tessera.core.processes.stop_tree); the run's
# process sends it to itself again at once (redeliver_lost_sigterms); as a last resort it is sent again this often,
# long enough after the first for Prefect to have ended the flow run in the normal case (a repeat cuts its crash
# handling short, leaving the flow run Running); once the train stage is stopping its workers, it ignores the
# repeats (tasks.train.stage.launch)
FLOW_SIGTERM_RESEND_S = 15.0
FLOW_STOP_GRACE_S = 60.0  # for the flow to stop its workers (they save a checkpoint) and run its hooks, then SIGKILL

DEPLOYMENT = "finetune/finetune"  # prefect.yaml's; `prefect deploy --all` makes it


def _submit(config: RunConfig, work_pool: str) -> TrainingRun:
    """A run of the `finetune` deployment with this run's parameters and name; a worker of `work_pool` executes it."""
    from prefect.deployments import run_deployment

    try:
        with _prefect_api(f"submit run {config.name}") as client:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
        if deployment.work_pool_name != work_pool:
            raise TesseraError(f"the deployment's work pool is {deployment.work_pool_name!r}, not TESSERA_WORK_POOL's "
                               f"{work_pool!r} (set TESSERA_WORK_POOL={deployment.work_pool_name}, or deploy it to {work_pool})")
        flow_run = run_deployment(DEPLOYMENT, parameters=config.parameters | {"run_name": config.name}, timeout=0)
    except Exception as exc:  # no such deployment, server unreachable: say what to do, keep nothing half-made
        runs.update(config.name, status=RunStatus.FAILED, completed_at=runs.now(), details=f"not submitted: {exc}")
        raise TesseraError(
            f"could not submit {config.name} to the Prefect deployment {DEPLOYMENT} at {os.environ['PREFECT_API_URL']}: {exc} "
            "(deploy it first: prefect deploy --all, README: Prefect; or unset TESSERA_WORK_POOL to run it here)"
        ) from None
    runs.update(config.name, status=RunStatus.QUEUED, prefect_flow_run_id=str(flow_run.id), work_pool=work_pool)
    runs.append_event(config.name, "run", f"queued: flow run {flow_run.name} of deployment {DEPLOYMENT}")
    return get(config.name)


@contextmanager
def _prefect_api(action: str):
    """A client of the Prefect server at PREFECT_API_URL; a server that cannot be reached is one message, naming it."""
    import httpx
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            yield client
    except httpx.TransportError as exc:
        raise TesseraError(
            f"could not reach the Prefect server at {os.environ.get('PREFECT_API_URL')} to {action}: {exc} "
            "(start it, or unset PREFECT_API_URL to record runs on this home's embedded server)"
        ) from None


def _prefect_state(record: RunRecord) -> RunRecord:
    """A run a worker executes, as Prefect sees it: its flow run's state mapped onto the service's statuses, and a
    run no worker has picked up QUEUED, saying which pool nobody polls. Nothing is marked FAILED from here."""
    use_prefect_api()
    with _prefect_api(f"read the state of run {record.config.name}") as client:
        flow_run = client.read_flow_run(record.prefect_flow_run_id)
        state = flow_run.state.type.value if flow_run.state else "PENDING"
        status = PREFECT_STATUSES.get(state, RunStatus.UNKNOWN)
        details = record.details
        if status is RunStatus.QUEUED and flow_run.work_pool_name:
            workers = client.read_workers_for_work_pool(flow_run.work_pool_name)
            if not any(w.status.value == "ONLINE" for w in workers):
                details = f"no worker is polling pool {flow_run.work_pool_name} (start one: prefect worker start --pool {flow_run.work_pool_name})"
    if status is record.status and details == record.details:
        return record
    if status.finished:  # the flow's own hooks write the outcome; a crash before they ran is told here
        return runs.update(record.config.name, status=status, completed_at=record.completed_at or runs.now(),
                           details=record.details or f"Prefect flow run state {state}: {flow_run.state.message}")
    return runs.update(record.config.name, status=status, details=details)


# Prefect's flow-run state types -> the service's statuses
PREFECT_STATUSES = {
    "SCHEDULED": RunStatus.QUEUED, "PENDING": RunStatus.STARTING, "RUNNING": RunStatus.RUNNING, "PAUSED": RunStatus.RUNNING,
    "CANCELLING": RunStatus.TERMINATING, "CANCELLED": RunStatus.STOPPED, "COMPLETED": RunStatus.COMPLETED,
    "FAILED": RunStatus.FAILED, "CRASHED": RunStatus.FAILED,
}


def get(run_or_name: TrainingRun | str) -> TrainingRun:
    name = run_or_name.name if isinstance(run_or_name, TrainingRun) else run_or_name
    return TrainingRun.from_record(_current(runs.load(name)))


def list(  # noqa: A001 - the SDK's name
    statuses: list[str] | None = None, limit: int | None = None,
    created_after: dt.datetime | None = None, created_before: dt.datetime | None = None,
) -> list[TrainingRun]:
    """Runs, as list_records orders them, of the given statuses and created in the given window (naive times are UTC)."""
    found = [TrainingRun.unknown(r) if isinstance(r, runs.UnreadableRecord) else TrainingRun.from_record(_current(r))
             for r in runs.list_records()]
    if statuses:
        found = [r for r in found if r.status.value in {s.upper() for s in statuses}]
    utc = lambda t: t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t  # noqa: E731
    if created_after is not None:
        found = [r for r in found if utc(r.created_at) >= utc(created_after)]
    if created_before is not None:
        found = [r for r in found if utc(r.created_at) < utc(created_before)]
    return found[:limit] if limit else found


def _flow_run_on_server(record: RunRecord):
    """The run's flow run on the Prefect server at PREFECT_API_URL if a worker executes it (a run of a deployment,
    queued or running), else None: a run fm.create started here is stopped through its own process."""
    if not (record.prefect_flow_run_id and record.work_pool):
        return None
    use_prefect_api()
    from prefect.exceptions import ObjectNotFound

    with _prefect_api(f"cancel run {record.config.name}") as client:
        try:
            return client.read_flow_run(record.prefect_flow_run_id)
        except ObjectNotFound:
            return None


def _cancel_flow_run(flow_run_id, grace: float = 60) -> None:
    """Cancel a flow run as the Prefect UI does: Cancelling, which Prefect's server turns into Cancelled at once for
    a run no worker has picked up, and which the worker of a started one acts on by stopping its process. Waits up to
    `grace` for it to end, as a run started here gets to end."""
    from prefect.states import Cancelling

    with _prefect_api(f"cancel flow run {flow_run_id}") as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="cancelled by the user"))
        deadline = time.monotonic() + grace
        while not client.read_flow_run(flow_run_id).state.is_final() and time.monotonic() < deadline:
            time.sleep(0.5)


def cancel(run_or_name: TrainingRun | str) -> None:
    """Stop a run and everything it started (the flow, torchrun and its workers); nothing is registered. A run of
    the `finetune` deployment is cancelled in Prefect, queued or running; a run started here, by its process."""
    run = get(run_or_name)
    if run.status.finished:
        raise TesseraError(f"run {run.name} already finished ({run.status.value})")
    record = runs.load(run.name)
    flow_run = _flow_run_on_server(record)
    if flow_run is None and runs.on_other_host(record):
        raise TesseraError(
            f"run {run.name} runs on host {record.host}, not this one ({runs.this_host()}): cancel it there, "
            "or from the Prefect UI"
        )
    # TERMINATING first: a flow run starting meanwhile sees the cancel and ends at once (runs.cancelled)
    record = runs.update(run.name, status=RunStatus.TERMINATING)
    if flow_run is not None:
        _cancel_flow_run(flow_run.id)
    elif record.pid:  # its SIGTERM reaches the flow as a crash, torchrun and its workers as a stop
        stop_tree(record.pid, record.pid_create_time, grace=FLOW_STOP_GRACE_S, resend_every=FLOW_SIGTERM_RESEND_S)
    runs.stop(run.name, "cancelled by the user")
    if flow_run is None and record.prefect_flow_run_id:  # its hooks say so, but a flow killed at the grace's end cannot
        use_prefect_api()
        with _prefect_api(f"show run {run.name} cancelled"):
            runs.show_cancelled(record.prefect_flow_run_id)


def get_events(run_or_name: TrainingRun | str, follow: bool = False, poll: float = 1.0) -> list[dict] | Iterator[dict]:
    """The run's lifecycle events so far (queued, started, data validated, each evaluation, registered, promoted or
    rejected, completed or failed with the reason). With `follow`, an iterator that yields each event as it is
    written and ends once the run has finished."""
    name = run_or_name.name if isinstance(run_or_name, TrainingRun) else run_or_name
    runs.load(name)
    return _follow(name, poll) if follow else runs.read_events(name)


def _follow(name: str, poll: float) -> Iterator[dict]:
    seen, finished_reads = 0, 0
    while finished_reads < 2:  # once finished, one more read: the hook writes its last event right after the status
        finished_reads += get(name).status.finished
        events = runs.read_events(name)
        yield from events[seen:]
        seen = len(events)
        if finished_reads < 2:
            time.sleep(poll)


def print_until_done(name: str, poll: float = 1.0) -> int:
    """Print a run's events as they come (the CLI's --wait and --follow, the demo); 0 if it completed, else 1."""
    for e in get_events(name, follow=True, poll=poll):
        print(f"{e['time'][11:19]} [{e['stage']}] {e['message']}", flush=True)
    run = get(name)
    if run.status.value == "COMPLETED":
        print(f"run {name} completed: {run.registered_model_version}")
        return 0
    print(f"error: run {name} {run.status.value.lower()}: {run.details}", file=sys.stderr)
    return 1


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
    return report_for(resolve_run(config))


def get_models() -> list[ModelSpec]:
    return [m for m in catalog().values()]


def _stop_when_cancelled_in_prefect(name: str, poll: float = 2.0) -> None:
    """For a run started here, nothing but its own process acts on a cancel from the Prefect UI (no worker watches
    its flow run): when the flow run turns Cancelling, stop what the run started (torchrun and its workers) as
    fm.cancel does, record the run STOPPED, and end this process's flow with SIGTERM (its hooks show it Cancelled).
    Runs in a daemon thread of the run's process."""
    import signal

    import psutil
    from prefect import get_client

    while True:
        time.sleep(poll)
        record = runs.load(name)
        if record.status.finished:
            return
        if not record.prefect_flow_run_id:
            continue
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(record.prefect_flow_run_id).state
        except Exception:  # the server is away for a moment: ask again
            continue
        if state is not None and state.is_cancelling():
            runs.update(name, only_if=lambda r: not r.status.finished, status=RunStatus.TERMINATING)
            for child in psutil.Process().children():
                stop_tree(child.pid, child.create_time(), grace=60)
            runs.stop(name, "cancelled from Prefect")
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _execute(name: str) -> int:
    """Body of the detached process fm.create starts: run the flow for a recorded run, recorded by the Prefect server
    fm.create chose (PREFECT_API_URL, inherited)."""
    import threading

    apply_engine_defaults()
    use_prefect_api()
    from flows.finetune import finetune

    threading.Thread(target=_stop_when_cancelled_in_prefect, args=(name,), daemon=True).start()
    try:
        finetune(run_name=name, **runs.load(name).config.parameters)
    except BaseException as exc:  # the flow's hooks recorded the reason; make sure nothing stays RUNNING
        reason = str(exc) if isinstance(exc, TesseraError) else f"{type(exc).__name__}: {exc}"
        runs.update(name, only_if=lambda r: not (r.status.finished or r.status is RunStatus.TERMINATING),
                    status=RunStatus.FAILED, completed_at=runs.now(), details=reason)
        return 1
    return 0


if __name__ == "__main__":
    redeliver_lost_sigterms()
    try:
        sys.exit(_execute(sys.argv[1]))
    finally:
        skip_final_collection()
