"""Runs and their records: adoption by a flow run only of equal parameters, hooks that never touch another run's
record, STOPPED on a cancel from Prefect, liveness by process identity (pid, start time, host), and embedded stores
created once under a lock when runs start at the same moment on a fresh home."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from contextlib import suppress
from types import SimpleNamespace

import psutil
import pytest

from conftest import chat, write_jsonl


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """A bare TESSERA_HOME (no model in it): enough for records, locks and liveness."""
    home = tmp_path / "home"
    monkeypatch.setenv("TESSERA_HOME", str(home))
    return home


def _config(name="run-1", **overrides):
    from tessera.core.config import build_run_config

    params = dict(model="tessera/tiny-chat", train_data_path="/data/chat.jsonl", register_to="main.ft.bot",
                  training_duration="2ba")
    return build_run_config(name=name, **{**params, **overrides})


def _record(name="run-1", status="RUNNING", **fields):
    from tessera.core import runs

    record = runs.RunRecord(config=_config(name), created_at=runs.now(), status=status, **fields)
    return runs.save(record)


def _flow_run(parameters: dict, flow_run_id=None):
    return SimpleNamespace(id=flow_run_id or uuid.uuid4(), name="prefect-name", parameters=parameters)


def _prefect_parameters(config, **changes) -> dict:
    """What Prefect hands a hook: JSON parameters, the SDK's run_name among them."""
    return json.loads(json.dumps({**config.parameters, "run_name": config.name, **changes}))


# --- 1. adoption -------------------------------------------------------------------------------------------------

def test_a_flow_run_adopts_a_record_whose_configuration_is_its_parameters(fresh_home):
    from tessera.core import runs

    saved = runs.save(runs.RunRecord(config=_config().model_copy(update={"created_by": "someone-else"}), created_at=runs.now()))
    # as Prefect passes them (JSON, run_name included) and as a caller might (defaults left out, None for unset)
    assert runs.ensure_record("run-1", _prefect_parameters(saved.config)) == saved
    sparse = dict(model="tessera/tiny-chat", train_data_path="/data/chat.jsonl", register_to="main.ft.bot",
                  training_duration="2ba", learning_rate=None, training_config={"seed": 0})
    assert runs.ensure_record("run-1", sparse) == saved


def test_a_flow_run_of_other_parameters_is_refused_naming_each_difference(fresh_home):
    from tessera.core import runs
    from tessera.core.errors import TesseraError

    saved = _record(status="PENDING")
    before = runs._record_file("run-1").read_bytes()
    params = _prefect_parameters(saved.config, training_duration="3ba", learning_rate=0.001,
                                 training_config={**saved.config.parameters["training_config"], "seed": 7})
    with pytest.raises(TesseraError) as info:
        runs.ensure_record("run-1", params)
    message = str(info.value)
    assert "a run named 'run-1' already exists with other parameters" in message
    assert "training_duration: the record has '2ba', this flow run '3ba'" in message
    assert "learning_rate: the record has None, this flow run 0.001" in message
    assert "training_config.seed: the record has 0, this flow run 7" in message
    assert runs._record_file("run-1").read_bytes() == before  # the other run's record is untouched


def test_a_table_the_record_pinned_is_the_table_as_given(fresh_home):
    from tessera.core import runs

    record = runs.save(runs.RunRecord(config=_config(train_data_path="main.sales.chats@v3"), created_at=runs.now()))
    assert runs.ensure_record("run-1", _prefect_parameters(record.config, train_data_path="main.sales.chats")) == record
    assert runs.parameter_differences(record.config, _prefect_parameters(record.config, train_data_path="main.sales.other"))


def test_a_flow_run_without_a_record_gets_one_from_its_own_parameters_under_a_model_based_name(fresh_home):
    from tessera.core import runs

    params = _prefect_parameters(_config(), run_name=None)
    flow_run_id = uuid.uuid4()
    name = runs.flow_run_name(params, flow_run_id)
    assert name == f"tiny-chat-{flow_run_id.hex[-6:]}"
    record = runs.ensure_record(name, params)
    assert record.config.name == name and not runs.parameter_differences(record.config, params)
    assert runs.load(name) == record


def test_hooks_of_a_refused_flow_run_leave_the_other_runs_record_alone(fresh_home, monkeypatch):
    from tessera.core import runs

    monkeypatch.setattr(runs, "_cancelling_in_prefect", lambda flow_run: False)
    saved = _record(status="RUNNING", prefect_flow_run_id=str(uuid.uuid4()))
    intruder = _flow_run(_prefect_parameters(saved.config, training_duration="9ba"))
    before = runs._record_file("run-1").read_bytes()
    runs.on_running(None, intruder, None)
    failed = SimpleNamespace(result=lambda raise_on_failure=False: ValueError("boom"), message="boom")
    runs.on_failure(None, intruder, failed)
    runs.on_completion(None, intruder, None)
    runs.on_cancellation(None, intruder, SimpleNamespace(message="cancelled"))
    assert runs._record_file("run-1").read_bytes() == before
    assert runs.read_events("run-1") == []


# --- 3. a cancel from Prefect ends STOPPED -----------------------------------------------------------------------

def _running_flow_run(monkeypatch, cancelling=False):
    from tessera.core import runs

    monkeypatch.setattr(runs, "_cancelling_in_prefect", lambda flow_run: cancelling)
    saved = _record(status="PENDING")
    flow_run = _flow_run(_prefect_parameters(saved.config))
    runs.on_running(None, flow_run, None)
    record = runs.load("run-1")
    assert record.status.value == "RUNNING" and record.prefect_flow_run_id == str(flow_run.id)
    assert record.pid == os.getpid() and record.host == runs.this_host()
    assert record.pid_create_time == pytest.approx(psutil.Process().create_time(), abs=0.5)
    return flow_run


def test_a_cancel_from_prefect_ends_the_run_stopped_even_after_the_kill_was_recorded_as_a_crash(fresh_home, monkeypatch):
    from tessera.core import runs

    flow_run = _running_flow_run(monkeypatch)
    crashed = SimpleNamespace(result=lambda raise_on_failure=False: None, message="Execution was aborted by a termination signal")
    runs.on_failure(None, flow_run, crashed)  # the worker's SIGTERM reached the flow first
    assert runs.load("run-1").status.value == "FAILED"
    runs.on_cancellation(None, flow_run, SimpleNamespace(message="cancelled from the UI"))
    record = runs.load("run-1")
    assert record.status.value == "STOPPED" and record.completed_at is not None
    assert record.details == "cancelled from Prefect (cancelled from the UI)"
    runs.on_cancellation(None, flow_run, SimpleNamespace(message=None))  # hooks may run twice: one event
    assert [e["message"] for e in runs.read_events("run-1")].count("stopped: cancelled from Prefect (cancelled from the UI)") == 1


def test_a_crash_while_prefect_is_cancelling_is_recorded_stopped(fresh_home, monkeypatch):
    from tessera.core import runs

    flow_run = _running_flow_run(monkeypatch, cancelling=True)
    runs.on_failure(None, flow_run, SimpleNamespace(result=lambda raise_on_failure=False: None, message="aborted"))
    assert runs.load("run-1").status.value == "STOPPED"


def test_a_cancel_never_overwrites_a_completed_run(fresh_home, monkeypatch):
    from tessera.core import runs

    flow_run = _running_flow_run(monkeypatch)
    runs.on_completion(None, flow_run, None)
    runs.on_cancellation(None, flow_run, SimpleNamespace(message="late"))
    assert runs.load("run-1").status.value == "COMPLETED"


def test_the_finetune_flow_registers_the_cancellation_hook():
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "flows" / "finetune.py").read_text()
    assert "on_cancellation=[runs.on_cancellation]" in source
    ast.parse(source)


@pytest.mark.parametrize("status", ["STOPPED", "TERMINATING"])
def test_hooks_of_a_cancelled_flow_run_never_reopen_its_record(fresh_home, status):
    """fm.cancel stopped (or is stopping) the run before a worker picked its flow run up: the flow run's hooks
    leave the record as the cancel wrote it."""
    from tessera.core import runs

    flow_run = _flow_run({}, flow_run_id=uuid.uuid4())
    saved = _record(status=status, prefect_flow_run_id=str(flow_run.id), details="cancelled by the user")
    flow_run.parameters = _prefect_parameters(saved.config)
    before = runs._record_file("run-1").read_bytes()
    runs.on_running(None, flow_run, None)
    if status == "STOPPED":  # a cancel still under way may yet find the run completed
        runs.on_completion(None, flow_run, None)
    assert runs._record_file("run-1").read_bytes() == before
    assert runs.read_events("run-1") == []


def test_a_finetune_flow_run_of_a_cancelled_run_ends_cancelled_and_trains_nothing(fresh_home, monkeypatch):
    import prefect.runtime.flow_run

    from flows.finetune import finetune
    from tessera.core import runs

    saved = _record(status="STOPPED", details="cancelled by the user")
    parameters = _prefect_parameters(saved.config)
    monkeypatch.setattr(prefect.runtime.flow_run, "parameters", parameters, raising=False)  # as Prefect's docs mock it
    state = finetune.fn(**parameters)  # the flow's body, as a worker that picked the flow run up runs it
    assert state.is_cancelled(), state
    assert runs.load("run-1") == saved and runs.read_events("run-1") == []


def _flow_run_state(flow_run_id: str, final: bool = True, timeout: float = 10) -> str:
    """The flow run's state type on the session's Prefect server (PREFECT_API_URL), waiting up to `timeout` for it to
    be final (the server may record it a moment after the process ended)."""
    from prefect import get_client

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if not final or state.is_final() or time.time() > deadline:
                return state.type.value
            time.sleep(0.2)


def _workers_of(name: str) -> list:
    """A local run's training processes that run now: the launcher a fork server forked (tessera.core.forkserver) and
    the workers it forked (tasks.train.standalone)."""
    from tessera.core import forkserver

    found = []
    for pid, cmd in forkserver.forked():
        if f"/{name}/" in " ".join(cmd):
            with suppress(psutil.Error):
                launcher = psutil.Process(pid)
                found += [launcher, *launcher.children()]
    return found


def _processes_of(name: str, record) -> list:
    """A local run's processes: its flow's process, what that started, and its training workers."""
    flow = psutil.Process(record.pid)
    return [flow, *flow.children(recursive=True), *_workers_of(name)]


def _running_local_run(home):
    """A local run (fm.create, no work pool) that trains for long, once its flow run is Running in Prefect."""
    from tessera import foundation_model as fm

    path = write_jsonl(home / "chat.jsonl", [chat("Say hi.", "Hi!"), chat("Name a colour.", "Blue.")])
    run = fm.create(model="tessera/tiny-chat", train_data_path=str(path), register_to="main.ft.never",
                    training_duration="1_000_000ba")
    deadline = time.time() + 120
    while fm.get(run.name).status.value != "RUNNING":
        assert time.time() < deadline and not fm.get(run.name).status.finished, (home / "runs" / run.name / "run.log").read_text()[-3000:]
        time.sleep(0.2)
    return run


@pytest.mark.slow
def test_fm_cancel_of_a_local_run_shows_its_flow_run_cancelled_in_prefect(home):
    """fm.create with no work pool runs the flow in a process of its own, recorded by the Prefect server (the
    session's, as a user's embedded one): the kill fm.cancel sends is not reported there as a crash."""
    from tessera import foundation_model as fm
    from tessera.core import runs

    run = _running_local_run(home)
    fm.cancel(run.name)
    assert fm.get(run.name).status.value == "STOPPED", fm.get(run.name)
    state = _flow_run_state(runs.load(run.name).prefect_flow_run_id)
    assert state == "CANCELLED", (state, (home / "runs" / run.name / "run.log").read_text()[-3000:])


@pytest.mark.slow
def test_a_local_run_that_does_not_stop_in_time_is_killed_and_shown_cancelled(home, monkeypatch):
    """A flow that cannot act on fm.cancel's SIGTERM (here: stopped with SIGSTOP) is killed, with what it started,
    at the grace's end; with no hook left to say so, fm.cancel itself shows its flow run Cancelled in Prefect."""
    from tessera import foundation_model as fm
    from tessera import sdk
    from tessera.core import runs

    run = _running_local_run(home)
    record = runs.load(run.name)
    process = psutil.Process(record.pid)
    _wait_until(lambda: _workers_of(run.name), "the run's training worker", log=home / "runs" / run.name / "run.log")
    tree = _processes_of(run.name, record)
    monkeypatch.setattr(sdk, "FLOW_STOP_GRACE_S", 2.0)
    process.suspend()
    fm.cancel(run.name)
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == [], alive
    assert fm.get(run.name).status.value == "STOPPED", fm.get(run.name)
    assert _flow_run_state(record.prefect_flow_run_id) == "CANCELLED"


@pytest.mark.slow
def test_a_cancel_from_the_prefect_ui_stops_a_local_run(home):
    """The UI's cancel of a run started here (its flow run set Cancelling, as the UI does): the run's own process
    acts on it (no worker watches it), stops training and ends STOPPED, its flow run Cancelled, no process left."""
    from prefect import get_client
    from prefect.states import Cancelling

    from tessera import foundation_model as fm
    from tessera.core import runs

    run = _running_local_run(home)
    record = runs.load(run.name)
    tree = _processes_of(run.name, record)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(record.prefect_flow_run_id, Cancelling(message="from the UI"))
    gone, alive = psutil.wait_procs(tree, timeout=90)
    assert alive == [], alive
    assert fm.get(run.name).status.value == "STOPPED", fm.get(run.name)
    assert fm.get(run.name).details.startswith("cancelled from Prefect")
    state = _flow_run_state(record.prefect_flow_run_id)
    assert state == "CANCELLED", (state, (home / "runs" / run.name / "run.log").read_text()[-3000:])


def test_an_unreadable_record_or_a_half_written_event_never_breaks_the_other_runs(fresh_home):
    """A record cut short (a full disk) or of an older schema is listed UNKNOWN with the reason; the CLI shows no
    traceback; an events line read while it is being written is skipped until it is whole."""
    from tessera import foundation_model as fm
    from tessera.core import runs

    _record("good", status="COMPLETED")
    for name, text in {"cut": '{"config": {"name": "cut", "mod', "old": '{"config": {"name": "old"}, "status": "DONE"}'}.items():
        (fresh_home / "runs" / name).mkdir(parents=True)
        (fresh_home / "runs" / name / "run.json").write_text(text)
    listed = {r.name: r for r in fm.list()}
    assert listed["good"].status.value == "COMPLETED"
    for name in ("cut", "old"):
        assert listed[name].status.value == "UNKNOWN" and listed[name].details.startswith("unreadable record "), listed[name]
    cli = subprocess.run([sys.executable, "-m", "tessera.cli", "runs", "list"], capture_output=True, text=True, env=os.environ.copy())
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr
    assert sorted(line.split()[0] for line in cli.stdout.splitlines()) == ["cut", "good", "old"]
    assert "UNKNOWN" in next(line for line in cli.stdout.splitlines() if line.startswith("cut"))
    shown = subprocess.run([sys.executable, "-m", "tessera.cli", "runs", "get", "cut"], capture_output=True, text=True, env=os.environ.copy())
    assert shown.returncode == 1 and shown.stderr.startswith("error: run cut: unreadable record ") and "Traceback" not in shown.stderr

    runs.append_event("good", "run", "whole")
    with open(fresh_home / "runs" / "good" / "events.jsonl", "a") as f:
        f.write('{"time": "2026-12-06T05:00:00", "stage": "tr')  # being written
    assert [e["message"] for e in fm.get_events("good")] == ["whole"]


def test_runs_delete_and_cache_prune_keep_what_a_resumable_run_needs(fresh_home):
    """`tessera cache prune` removes prepared data only no run still going or resumable needs; `tessera runs delete`
    removes a finished run's folder and checkpoints, and refuses a running one."""
    import datetime as dt

    from tessera.core import checkpoints, runs
    from tessera.core.checkpoints import CheckpointInfo

    prepared = {k: fresh_home / "prepared" / k for k in ("done", "resumable", "eval", "running")}
    for path in prepared.values():
        path.mkdir(parents=True)
        (path / "manifest.json").write_text("{}")

    def job(name, train, evaluation=None):
        (fresh_home / "runs" / name / "train_job.json").write_text(
            json.dumps({"prepared_path": str(prepared[train]), "eval_prepared_path": evaluation and str(prepared[evaluation])}))

    _record("finished", status="COMPLETED")
    job("finished", "done")
    root = fresh_home / "ckpt" / "stopped"
    checkpoints.mark_complete(checkpoints.folder(root, 5), CheckpointInfo(
        step=5, epoch=1.0, tokens_seen=10, world_size=1, seed=0, reason="preempted", saved_at=dt.datetime.now(dt.timezone.utc)))
    _record("stopped", status="STOPPED", checkpoint_dir=str(root))
    job("stopped", "resumable", "eval")
    _record("going", status="RUNNING", **runs.process_identity(os.getpid()))
    job("going", "running")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True, env=os.environ.copy())

    pruned = cli("cache", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(p.name for p in (fresh_home / "prepared").iterdir()) == ["eval", "resumable", "running"]
    assert "1 prepared dataset(s) removed, 3 kept" in pruned.stdout

    refused = cli("runs", "delete", "going")
    assert refused.returncode == 1 and refused.stderr.startswith("error: run going is RUNNING: cancel it first")
    deleted = cli("runs", "delete", "stopped")
    assert deleted.returncode == 0, deleted.stderr
    assert not root.exists() and not (fresh_home / "runs" / "stopped").exists()
    assert cli("cache", "prune").returncode == 0  # the stopped run is gone: its data may go now
    assert sorted(p.name for p in (fresh_home / "prepared").iterdir()) == ["running"]


def _wait_until(condition, what: str, timeout: float = 120, log=None):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what}: not after {timeout}s" + (f"; log: {log.read_text()[-3000:]}" if log else "")
        time.sleep(0.2)


@pytest.mark.slow
def test_a_stopped_run_resumes_and_a_killed_flow_leaves_no_worker_and_resumes_too(home):
    """fm.cancel ends a run STOPPED (its worker saves a checkpoint on the way out); fm.resume reopens it and it goes
    on from its last checkpoint; SIGKILL to the flow's process leaves no training worker alive (they exit when it is
    gone) and the run FAILED, resumable; a second resume completes it, in one MLflow run with each step logged once."""
    from tessera import foundation_model as fm
    from tessera.core import runs
    from tessera.core.tracking import mlflow_client

    path = write_jsonl(home / "chat.jsonl", [chat("Say hi.", "Hi!"), chat("Name a colour.", "Blue.")])
    run = fm.create(model="tessera/tiny-chat", train_data_path=str(path), register_to="main.ft.resumed",
                    training_duration="300ba", training_config={"checkpoint_every": 20})
    log = home / "runs" / run.name / "run.log"
    _wait_until(lambda: fm.get_checkpoints(run.name), "a first checkpoint", log=log)
    fm.cancel(run.name)
    stopped = fm.get(run.name)
    assert stopped.status.value == "STOPPED" and "resumable from step" in stopped.details, stopped.details
    first = fm.get_checkpoints(run.name)[-1].step
    assert stopped.save_folder == runs.load(run.name).checkpoint_dir

    assert fm.resume(run.name).status.value in ("PENDING", "RUNNING")
    _wait_until(lambda: fm.get_checkpoints(run.name)[-1].step > first and fm.get(run.name).status.value == "RUNNING",
                "a checkpoint after the resume", log=log)
    record = runs.load(run.name)
    flow = psutil.Process(record.pid)
    workers = _workers_of(run.name)
    assert workers
    flow.kill()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], "a training worker outlived its flow"
    failed = fm.get(run.name)
    assert failed.status.value == "FAILED" and "resumable from step" in failed.details, failed.details

    fm.resume(run.name)
    _wait_until(lambda: fm.get(run.name).status.finished, "the resumed run's end", timeout=240, log=log)
    done = fm.get(run.name)
    assert done.status.value == "COMPLETED", done.details
    steps = [m.step for m in mlflow_client().get_metric_history(done.run_id, "loss")]
    events = [e["message"] for e in fm.get_events(run.name)]
    assert sorted(steps) == list(range(5, 301, 5)), events  # each logged step (every 5th) once, across three processes
    assert done.run_id == stopped.run_id and done.registered_model_version
    assert sum(m.startswith("resumed from the checkpoint at step") for m in events) == 2


def test_metric_records_a_killed_stage_never_read_are_logged_by_the_stage_that_resumes(home):
    """A train stage killed while its worker's records still sat unread in the pipe (their steps behind a checkpoint
    the worker had already saved, so the resumed worker never makes them again): the worker also appended them to
    the run's metrics file, and the resuming stage logs the ones MLflow lacks, each step once."""
    from tasks.train.report import METRICS_FILE, RECORD_MARKER, MlflowRelay, Reporter
    from tessera.core import runs
    from tessera.core.training import TrainJob
    from tessera.core.tracking import experiment_id, mlflow_client

    client = mlflow_client()
    exp = experiment_id(client, "/relay")
    run_id = client.create_run(exp).info.run_id
    job = TrainJob.model_construct(run_name="relayed")
    runs.run_dir("relayed").mkdir(parents=True)
    first, worker = MlflowRelay(), Reporter(job, rank=0)
    first.open(client, exp, run_id)
    for step in range(5, 45, 5):  # the worker got to step 40; the stage read up to step 15, then it was killed
        worker.metrics(step, loss=100.0 / step)
        if step <= 15:
            last = (runs.run_dir("relayed") / METRICS_FILE).read_text().splitlines()[-1]
            assert last.startswith(RECORD_MARKER) and first.handle(last)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [5, 10, 15]

    resumed = MlflowRelay()
    resumed.open(client, exp, run_id, resumed_run="relayed")  # the checkpoint was at step 30: the worker goes on from 35
    for step in (35, 40, 45):
        resumed.handle(RECORD_MARKER + json.dumps({"kind": "metrics", "step": step, "time_ms": 0, "values": {"loss": 100.0 / step}}))
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(5, 50, 5))
    assert all(m.value == pytest.approx(100.0 / m.step) for m in history)


# --- 4. liveness: pid, start time, host --------------------------------------------------------------------------

@pytest.fixture
def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_live_process_of_the_recorded_start_time_is_alive(fresh_home):
    from tessera import foundation_model as fm
    from tessera.core import runs

    _record(**runs.process_identity(os.getpid()))
    assert fm.get("run-1").status.value == "RUNNING"


def test_a_reused_pid_is_dead(fresh_home):
    from tessera import foundation_model as fm
    from tessera.core import runs
    from tessera.core.processes import process_alive

    started = psutil.Process().create_time()
    _record(pid=os.getpid(), pid_create_time=started - 1000, host=runs.this_host())  # our pid, another process's start
    assert not process_alive(os.getpid(), started - 1000) and process_alive(os.getpid(), started)
    run = fm.get("run-1")
    assert run.status.value == "FAILED" and f"process ({os.getpid()}) exited unexpectedly" in run.details


def test_a_dead_process_fails_the_run_and_a_stopping_one_ends_stopped(fresh_home, dead_pid):
    from tessera import foundation_model as fm
    from tessera.core import runs

    _record("run-1", pid=dead_pid, pid_create_time=1.0, host=runs.this_host())
    _record("run-2", status="TERMINATING", pid=dead_pid, pid_create_time=1.0, host=runs.this_host())
    assert fm.get("run-1").status.value == "FAILED"
    assert fm.get("run-2").status.value == "STOPPED"


def test_a_run_recorded_by_another_host_is_never_failed_here(fresh_home, dead_pid):
    from tessera import foundation_model as fm
    from tessera.core.errors import TesseraError

    _record(pid=dead_pid, pid_create_time=1.0, host="another-host.example")
    assert fm.get("run-1").status.value == "RUNNING"
    assert [r.status.value for r in fm.list()] == ["RUNNING"]
    with pytest.raises(TesseraError, match="runs on host another-host.example"):
        fm.cancel("run-1")
    assert fm.get("run-1").status.value == "RUNNING"


def test_records_from_before_start_times_still_load_and_judge_by_what_they_have(fresh_home, dead_pid):
    from tessera import foundation_model as fm
    from tessera.core import runs

    started = psutil.Process().create_time()
    for name, pid, started_at in [("old-live", os.getpid(), started + 60), ("old-reused", os.getpid(), started - 1000),
                                  ("old-dead", dead_pid, None)]:
        record = _record(name, pid=pid, started_at=started_at and dt.datetime.fromtimestamp(started_at, dt.timezone.utc))
        data = json.loads(record.model_dump_json())
        del data["pid_create_time"], data["host"]  # as an older Tessera wrote it
        runs._record_file(name).write_text(json.dumps(data))
    assert runs.load("old-live").pid_create_time is None
    assert fm.get("old-live").status.value == "RUNNING"
    assert fm.get("old-reused").status.value == "FAILED"  # that pid's process started after the run was running
    assert fm.get("old-dead").status.value == "FAILED"


def test_cancel_never_signals_a_process_that_only_has_the_runs_pid(fresh_home):
    from tessera.core.processes import stop_tree

    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        real = psutil.Process(other.pid).create_time()
        stop_tree(other.pid, real - 1000, grace=0)  # the pid of a run that ended; someone else's process has it now
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_run_with_no_record_here_is_looked_up_in_mlflow_and_refused_while_heard_from_or_once_completed(home):
    """fm.resume on a host without the run's record finds its MLflow run by its name tag; it refuses one that
    completed, one still heard from (its heartbeat), and one whose MLflow run keeps no configuration, recording
    nothing here. A resume also refuses data prepared otherwise than when the run started."""
    from types import SimpleNamespace

    from tasks.train.stage import same_data
    from tessera import foundation_model as fm
    from tessera.core import runs, tracking
    from tessera.core.errors import TesseraError

    client = tracking.mlflow_client()
    experiment = tracking.experiment_id(client, "/elsewhere")

    def mlflow_run(name: str, status: str, heard_ago: float | None = None) -> str:
        tags = {tracking.RUN_NAME_TAG: name, tracking.HOST_TAG: "gpu-7"}
        if heard_ago is not None:
            tags[tracking.HEARTBEAT_TAG] = f"{time.time() - heard_ago:.0f}"
        run_id = client.create_run(experiment, tags=tags).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    done = mlflow_run("done-1", "FINISHED")
    live = mlflow_run("live-1", "RUNNING", heard_ago=5)
    lost = mlflow_run("lost-1", "RUNNING", heard_ago=1000)  # its host gone: the lookup goes on, to its configuration
    refusals = {
        "done-1": f"run done-1 completed on gpu-7 (MLflow run {done}): there is nothing to resume",
        "live-1": f"run live-1 is still training on gpu-7 (MLflow run {live}), last heard from",
        "lost-1": f"run lost-1 ran on gpu-7 (MLflow run {lost}), which keeps no tessera/run_config.json: resume it on gpu-7",
    }
    for name, message in refusals.items():
        with pytest.raises(TesseraError) as refused:
            fm.resume(name)
        assert str(refused.value).startswith(message), str(refused.value)
        assert not runs.exists(name)

    prepared = SimpleNamespace(cache_key="b2", lineage={"source.path": "/data/chat.jsonl"})
    same_data("run-1", "b2", prepared)
    same_data("run-1", None, prepared)  # a run from before the key was logged
    with pytest.raises(TesseraError, match="run run-1 cannot resume on other data: .* prepared as a1 when it started and "
                                           "is b2 now \\(the data at /data/chat.jsonl"):
        same_data("run-1", "a1", prepared)


def test_a_flow_run_scheduled_again_after_crashes_runs_only_train_retries_times_more():
    """automations.yaml reschedules a crashed flow run; the flow refuses a run_count past 1 + train_retries."""
    from tessera.core import runs
    from tessera.core.config import build_run_config

    config = build_run_config(model="tessera/tiny-chat", train_data_path="d.jsonl", register_to="main.a.b", name="run-1",
                              training_config={"train_retries": 2})
    record = runs.RunRecord(config=config, created_at=runs.now())
    assert [runs.crashed_too_often(record, n) for n in (1, 2, 3)] == [None, None, None]
    assert runs.crashed_too_often(record, 4).startswith("run run-1 crashed 3 time(s): not run again (training_config train_retries 2)")


# --- 2. embedded stores created once, under a lock ---------------------------------------------------------------

def test_home_lock_excludes_other_processes(fresh_home):
    from tessera.core.paths import home_lock

    probe = [sys.executable, "-c", "from tessera.core.paths import home_lock\nwith home_lock('x', timeout=0.3): pass"]
    with home_lock("x"):
        held = subprocess.run(probe, capture_output=True, text=True, env=os.environ.copy())
    assert held.returncode != 0 and "still locked by another process" in held.stderr
    assert subprocess.run(probe, env=os.environ.copy()).returncode == 0


MLFLOW_FIRST_USE = """
import sys, time
from pathlib import Path
import mlflow  # imported before the start signal, so that all processes reach the store at the same moment
from tessera.core.tracking import experiment_id, mlflow_client
go = Path(sys.argv[1])
Path(sys.argv[2]).touch()
while not go.exists():
    time.sleep(0.01)
client = mlflow_client()
print(experiment_id(client, "/Users/test/tessera"))
"""


@pytest.mark.slow
def test_processes_creating_the_embedded_mlflow_store_at_once_all_succeed(fresh_home, tmp_path):
    go, ready = tmp_path / "go", [tmp_path / f"ready-{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", MLFLOW_FIRST_USE, str(go), str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for r in ready]
    deadline = time.time() + 120
    while not all(r.exists() for r in ready) and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()  # all at once on the fresh store
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1  # one experiment, the same for all


@pytest.mark.slow
def test_runs_started_at_the_same_moment_on_a_fresh_home_all_complete(home):
    from tessera import foundation_model as fm

    path = write_jsonl(home / "chat.jsonl", [chat("Say hi.", "Hi!"), chat("Name a colour.", "Blue."),
                                             chat("What is two and two?", "Four.")])
    started = [fm.create(model="tessera/tiny-chat", train_data_path=str(path), register_to="main.concurrent",
                         training_duration="2ba") for _ in range(2)]
    deadline = time.time() + 540
    while time.time() < deadline and not all(fm.get(r.name).status.finished for r in started):
        time.sleep(2)
    final = [fm.get(r.name) for r in started]
    assert [r.status.value for r in final] == ["COMPLETED"] * 2, [
        (r.name, r.status.value, r.details, (home / "runs" / r.name / "run.log").read_text()[-3000:]) for r in final
    ]
    assert len({r.registered_model_version for r in final}) == 2


def test_get_events_follows_a_run_until_it_finishes_and_list_filters_by_time(home):
    import datetime as dt
    import threading

    from tessera import foundation_model as fm
    from tessera.core import runs

    _record("followed", pid=None)
    runs.append_event("followed", "run", "running")

    def later():
        runs.append_event("followed", "train", "step 1/1")
        runs.append_event("followed", "register", "registered models:/a.b.c/1")
        runs.update("followed", status=runs.RunStatus.COMPLETED)
        runs.append_event("followed", "run", "completed")

    timer = threading.Timer(0.3, later)
    timer.start()
    followed = [e["message"] for e in fm.get_events("followed", follow=True, poll=0.05)]
    timer.join()
    assert followed == ["running", "step 1/1", "registered models:/a.b.c/1", "completed"]
    assert [e["message"] for e in fm.get_events("followed")] == followed  # without follow: what there is now

    created = fm.get("followed").created_at
    assert [r.name for r in fm.list(created_after=created - dt.timedelta(seconds=1))] == ["followed"]
    assert fm.list(created_after=created + dt.timedelta(seconds=1)) == []
    assert fm.list(created_before=created) == [] and [r.name for r in fm.list(created_before=created + dt.timedelta(seconds=1))] == ["followed"]


def test_a_prefect_server_that_cannot_be_reached_is_one_message_naming_it(fresh_home, monkeypatch):
    """A run submitted to a deployment is read and cancelled through PREFECT_API_URL: with that server down, get and
    cancel say so in one line (no httpx traceback), and the cancel changes nothing in the record."""
    from tessera import foundation_model as fm
    from tessera.core import runs
    from tessera.core.processes import free_port
    from tessera.core.errors import TesseraError

    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens on it
    monkeypatch.setenv("PREFECT_API_URL", url)
    _record(status="QUEUED", prefect_flow_run_id=str(uuid.uuid4()), work_pool="tessera")
    before = runs._record_file("run-1").read_bytes()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):  # Prefect read its settings when this process imported it
        for call in (fm.get, fm.cancel):
            with pytest.raises(TesseraError, match=f"^could not reach the Prefect server at {url} to read the state of run run-1: "):
                call("run-1")
    assert runs._record_file("run-1").read_bytes() == before
