"""prefect.yaml as the README deploys it: a real Prefect server on 127.0.0.1, the `tessera` process pool created
first, `prefect deploy --all`, and a real process worker running a deployment run on a fresh home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tessera.core.processes import stop_tree

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
DEPLOYMENTS = {"finetune", "scheduled-retrain", "retrain-on-new-data", "deploy-endpoint", "watch-data", "join-training"}


def api(url: str, path: str, body=None, method: str = "POST"):
    """A call to the Prefect server's REST API; its JSON answer (None for an empty one). Retried on 429 and 503 as
    Prefect's own client retries them: the server answers 503 while its SQLite database is busy with other writes."""
    data = None if method == "GET" else json.dumps({} if body is None else body).encode()
    for attempt in range(6):
        request = urllib.request.Request(f"{url}{path}", data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                answer = r.read()
            return json.loads(answer) if answer else None
        except urllib.error.HTTPError as exc:
            if exc.code not in (429, 503) or attempt == 5:
                raise
            time.sleep(2**attempt)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port; yields the environment that points at it."""
    from tessera.core.processes import free_port

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    # not an earlier test's MLflow store (mlflow.set_tracking_uri leaves MLFLOW_TRACKING_URI in os.environ): the home's own
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env = dict(inherited, PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_UI_ENABLED="false",
               TESSERA_HOME=str(home / "tessera"), TESSERA_WORK_POOL="tessera",  # fm.create submits to the pool
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5",
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")  # schedules turn into runs within seconds
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(home / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None and time.time() < deadline, (home / "server.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def deployed(prefect_server, tiny_model_dir):
    """The README's steps: create the pool, then deploy everything in prefect.yaml."""
    env = prefect_server
    models = Path(env["TESSERA_HOME"]) / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "tiny-chat").symlink_to(tiny_model_dir)
    pool = subprocess.run([*PREFECT, "work-pool", "create", "tessera", "--type", "process"], env=env, capture_output=True, text=True)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = subprocess.run([*PREFECT, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    return env


@pytest.fixture(scope="module")
def worker(deployed):
    """`prefect worker start --pool tessera`, polling every second, as the README starts it."""
    env = deployed
    process = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "tessera"], cwd=REPO, env=env,
                               stdout=open(Path(env["TESSERA_HOME"]) / "worker.log", "wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    yield env
    # no new runs first; then SIGTERM, and SIGKILL for whatever is left after the grace: the worker stops in under a
    # second, but stopped while a scheduled run it has just submitted starts, it was seen to take over 60 s
    api(env["PREFECT_API_URL"], "/work_pools/tessera", {"is_paused": True}, method="PATCH")
    stop_tree(process.pid, grace=10, popen=process)


def worker_log(env) -> str:
    return (Path(env["TESSERA_HOME"]) / "worker.log").read_text()[-3000:]


def deployment_id(env, name: str) -> str:
    return api(env["PREFECT_API_URL"], f"/deployments/name/{name}", method="GET")["id"]


def finished_runs(env, deployment: str, timeout: float = 360) -> list[dict]:
    """The flow runs of `deployment` (flow/deployment), once there is one and all are in a final state."""
    ident = deployment_id(env, deployment)
    deadline = time.time() + timeout
    while True:
        found = api(env["PREFECT_API_URL"], "/flow_runs/filter", {"deployments": {"id": {"any_": [ident]}}})
        if found and all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in found):
            return found
        assert time.time() < deadline, f"{deployment}: no finished run; worker log:\n{worker_log(env)}"
        time.sleep(2)


def sdk(env, code: str):
    """Run SDK code in a process of its own (Prefect's settings are read at import) and return what it printed, as JSON."""
    done = subprocess.run([sys.executable, "-c", f"import json; from tessera import foundation_model as fm; {code}"],
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_prefect_deploy_all_makes_every_deployment_with_a_described_form(deployed):
    url = deployed["PREFECT_API_URL"]
    deployments = {d["name"]: d for d in api(url, "/deployments/filter")}
    assert DEPLOYMENTS <= set(deployments), sorted(deployments)

    for name in ("finetune", "scheduled-retrain", "retrain-on-new-data", "join-training"):
        schema = deployments[name]["parameter_openapi_schema"]
        undescribed = [f"{name}.{field}" for field, spec in schema["properties"].items() if not spec.get("description")]
        for model_name, model in schema.get("definitions", {}).items():
            undescribed += [f"{model_name}.{f}" for f, spec in model.get("properties", {}).items() if not spec.get("description")]
        assert not undescribed, undescribed
    task_type = deployments["finetune"]["parameter_openapi_schema"]["properties"]["task_type"]
    choices = task_type.get("enum") or deployments["finetune"]["parameter_openapi_schema"]["definitions"]["TaskType"]["enum"]
    assert set(choices) == {"CHAT_COMPLETION", "INSTRUCTION_FINETUNE", "CONTINUED_PRETRAIN"}

    schedules = deployments["scheduled-retrain"]["schedules"]
    assert schedules and not any(s["active"] for s in schedules)  # ships switched off: it must name the user's data
    assert schedules[0]["schedule"]["cron"] and schedules[0]["schedule"]["timezone"]
    assert deployments["watch-data"]["schedules"][0]["schedule"].get("interval")

    triggers = api(url, "/automations/filter")
    retrain = [a for a in triggers if any(act.get("deployment_id") == deployments["retrain-on-new-data"]["id"] for act in a["actions"])]
    assert retrain and retrain[0]["trigger"]["expect"] == ["tessera.data.updated"]
    assert retrain[0]["trigger"]["for_each"] and retrain[0]["trigger"]["within"] > 0


def test_fm_create_with_a_server_submits_to_the_deployment_and_waits_for_a_worker(deployed):
    queued = sdk(deployed, "r = fm.create(model='tessera/tiny-chat', train_data_path='tessera/assets/demo_chat.jsonl', "
                           "register_to='main.sdk.bot', training_duration='2ba'); "
                           "print(json.dumps([r.name, fm.get(r.name).status.value, fm.get(r.name).details]))")
    name, status, details = queued
    assert status == "QUEUED" and details == "no worker is polling pool tessera (start one: prefect worker start --pool tessera)"
    (Path(deployed["TESSERA_HOME"]) / "sdk-run").write_text(name)  # picked up once the next test starts the worker


def test_fm_create_refuses_a_work_pool_that_is_not_the_deployments(deployed):
    """TESSERA_WORK_POOL names where a run executes: a pool the finetune deployment is not on is one message naming
    both, and the run is recorded FAILED, never queued anywhere."""
    env = dict(deployed, TESSERA_WORK_POOL="gpu")
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "create", "--model", "tessera/tiny-chat",
                           "--train-data-path", "tessera/assets/demo_chat.jsonl", "--register-to", "main.sdk.elsewhere",
                           "--training-duration", "2ba"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "the deployment's work pool is 'tessera', not TESSERA_WORK_POOL's 'gpu'" in done.stderr, done.stderr


CANCELLED_QUEUED = "main.sdk.cancelled"  # the register_to of the run the next test cancels while it is queued


def test_fm_cancel_of_a_queued_run_cancels_its_flow_run_so_no_worker_runs_it(deployed, request):
    env, url = deployed, deployed["PREFECT_API_URL"]
    name, flow_run_id = sdk(env, "r = fm.create(model='tessera/tiny-chat', train_data_path='tessera/assets/demo_chat.jsonl', "
                                 f"register_to='{CANCELLED_QUEUED}', training_duration='2ba'); fm.cancel(r); "
                                 "from tessera.core import runs; print(json.dumps([r.name, runs.load(r.name).prefect_flow_run_id]))")

    def state() -> dict:
        return api(url, f"/flow_runs/{flow_run_id}", method="GET")["state"]

    assert state()["type"] == "CANCELLED", state()  # in the UI: Cancelled, not queued, not Crashed

    env = request.getfixturevalue("worker")  # now a worker polls the pool
    deadline = time.time() + 60
    while not any(w["status"] == "ONLINE" for w in api(url, "/work_pools/tessera/workers/filter")):
        assert time.time() < deadline, worker_log(env)
        time.sleep(0.5)
    time.sleep(5)  # five of its polls (every second)
    run_dir = Path(env["TESSERA_HOME"]) / "runs" / name
    record = json.loads((run_dir / "run.json").read_text())
    events = [json.loads(line)["message"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert state()["type"] == "CANCELLED" and record["status"] == "STOPPED", (state(), record, worker_log(env))
    assert record["registered_version"] is None and events[-1] == "stopped: cancelled by the user", events
    assert not any(e.startswith("running") for e in events), events


def test_a_finetune_deployment_run_with_its_defaults_completes_on_a_worker(worker):
    env = worker
    run = subprocess.run([*PREFECT, "deployment", "run", "finetune/finetune", "--param", "training_duration=2ba"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    finished = [r for r in finished_runs(env, "finetune/finetune") if r["parameters"]["register_to"] != CANCELLED_QUEUED]
    assert [r["state"]["type"] for r in finished] == ["COMPLETED", "COMPLETED"], worker_log(env)
    # in the UI: the data report (markdown) and training progress, at 100% once trained
    artifacts = api(env["PREFECT_API_URL"], "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [finished[0]["id"]]}}})
    kinds = {a["type"]: a for a in artifacts}
    assert kinds["markdown"]["key"] == "data-report" and kinds["progress"]["data"] == 100.0, artifacts

    # the SDK's run, queued in the test before, ran on the worker and is seen as done, with its events
    name = (Path(env["TESSERA_HOME"]) / "sdk-run").read_text()
    status, stages = sdk(env, f"print(json.dumps([fm.get('{name}').status.value, [e['stage'] for e in fm.get_events('{name}')]]))")
    assert status == "COMPLETED" and {"run", "prepare", "train", "register"} <= set(stages), (status, stages)

    # the run has a record under a model-based name, found by the SDK
    listing = subprocess.run([sys.executable, "-m", "tessera.cli", "runs", "list"], env=env, capture_output=True, text=True)
    assert "tiny-chat-" in listing.stdout and "COMPLETED" in listing.stdout, listing.stdout + listing.stderr


def test_new_rows_in_a_delta_table_lead_to_a_new_champion_behind_an_endpoint(worker, tmp_path):
    """The whole chain with no human action after the data lands: the watcher sees the append, emits
    tessera.data.updated, the event starts retrain-on-new-data, the new version beats the base model, becomes
    @champion and is served behind the deployment's serve_to endpoint."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from conftest import chat, write_jsonl

    env = worker
    url, home = env["PREFECT_API_URL"], Path(env["TESSERA_HOME"])
    table, name = home / "warehouse" / "main" / "support" / "chats", "main.support.chats"  # a table by its catalog name
    rows = lambda start: pa.table({"messages": [chat(f"question {i}?", f"answer {i}.")["messages"] for i in range(start, start + 4)]})
    write_deltalake(str(table), rows(0))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [chat(f"question {i}?", f"answer {i}.") for i in range(8)])

    # the user points the event deployment at their model, eval set and endpoint (as in the UI), and watches the table
    ident = deployment_id(env, "retrain/retrain-on-new-data")
    api(url, f"/deployments/{ident}", {"parameters": {
        "model": "tessera/tiny-chat", "train_data_path": name, "eval_data_path": str(eval_path),
        "register_to": "main.chain.bot", "training_duration": "30ba", "learning_rate": 3e-3, "serve_to": "chain-bot"}},
        method="PATCH")
    watch = subprocess.run([sys.executable, "-c", f"from tasks.watch import watch; watch({name!r}, quiet_seconds=0)"],
                           env=env, capture_output=True, text=True, cwd=REPO)
    assert watch.returncode == 0, watch.stderr

    write_deltalake(str(table), rows(4), mode="append")  # new data lands
    checked = subprocess.run([*PREFECT, "deployment", "run", "watch-sources/watch-data"], env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    try:
        [retrained] = finished_runs(env, "retrain/retrain-on-new-data", timeout=420)
        assert retrained["state"]["type"] == "COMPLETED", worker_log(env)
        assert retrained["parameters"]["train_data_path"] == name and retrained["parameters"]["source_version"] == 1
        # the same event again (same id, as a repeated check would send it) starts no second retrain
        event = api(url, "/events/filter", {"filter": {"event": {"name": ["tessera.data.updated"]}}, "limit": 5})["events"][0]
        api(url, "/events", [event])
        time.sleep(5)
        runs = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [ident]}}})
        assert len(runs) == 1, [r["state"]["type"] for r in runs]

        status = subprocess.run([sys.executable, "-m", "tessera.cli", "endpoints", "get", "chain-bot", "--json"],
                                env=env, capture_output=True, text=True)
        served = json.loads(status.stdout)
        assert served["status"] == "READY" and served["model_uri"] == "models:/main.chain.bot@champion" and served["version"] == "1", served
        with urllib.request.urlopen(urllib.request.Request(
            f"{served['url']}/v1/chat/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"messages": [{"role": "user", "content": "question 5?"}], "max_tokens": 8}).encode()), timeout=60) as r:
            assert r.status == 200
    finally:
        subprocess.run([sys.executable, "-m", "tessera.cli", "endpoints", "stop", "chain-bot"], env=env, capture_output=True)


def test_a_schedule_runs_its_flow(worker):
    """watch-data on a short interval (the test's, instead of its 5 minutes): the scheduler makes runs, the worker runs them."""
    env, url = worker, worker["PREFECT_API_URL"]
    ident = deployment_id(env, "watch-sources/watch-data")
    [schedule] = api(url, f"/deployments/{ident}/schedules", [{"schedule": {"interval": 5}, "active": True}])
    try:
        deadline = time.time() + 120
        while True:
            runs = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [ident]}}, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
            if any(r["auto_scheduled"] for r in runs):
                break
            assert time.time() < deadline, worker_log(env)
            time.sleep(2)
    finally:  # a flow run every 5 s would load the machine for the module's later tests
        api(url, f"/deployments/{ident}/schedules/{schedule['id']}", method="DELETE")


def test_a_cancel_from_the_ui_ends_the_run_stopped(worker):
    env, url = worker, worker["PREFECT_API_URL"]
    started = subprocess.run([*PREFECT, "deployment", "run", "finetune/finetune", "--param", "training_duration=100000ba"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    ident = deployment_id(env, "finetune/finetune")
    deadline = time.time() + 180
    while True:  # wait until it trains
        [latest] = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [ident]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 1})
        name = f"tiny-chat-{latest['id'].replace('-', '')[-6:]}"
        record = Path(env["TESSERA_HOME"]) / "runs" / name / "events.jsonl"
        if latest["state"]["type"] == "RUNNING" and record.exists() and '"stage": "train"' in record.read_text():
            break
        assert time.time() < deadline and latest["state"]["type"] in ("SCHEDULED", "PENDING", "RUNNING"), worker_log(env)
        time.sleep(1)
    api(url, f"/flow_runs/{latest['id']}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
    deadline = time.time() + 120
    while (state := api(url, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [latest["id"]]}}})[0]["state"]["type"]) != "CANCELLED":
        assert time.time() < deadline, (state, worker_log(env))
        time.sleep(1)
    status = sdk(env, f"r = fm.get('{name}'); print(json.dumps([r.status.value, r.registered_model_version]))")
    deadline = time.time() + 30
    while status[0] != "STOPPED" and time.time() < deadline:  # the hook writes it as the flow process ends
        time.sleep(1)
        status = sdk(env, f"r = fm.get('{name}'); print(json.dumps([r.status.value, r.registered_model_version]))")
    assert status == ["STOPPED", None], status


def test_a_crashed_finetune_run_is_scheduled_again_and_resumes_from_its_checkpoint(worker):
    """automations.yaml, created as the README says: the flow run's process killed after a checkpoint (what a machine
    restart or an out-of-memory kill of the flow does) ends it Crashed; the automation schedules it again, the worker
    runs it, and it resumes from the checkpoint: the same flow run and MLflow run, each step logged once."""
    env, url = worker, worker["PREFECT_API_URL"]
    made = subprocess.run([*PREFECT, "automation", "create", "--from-file", "automations.yaml"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    names = {a["name"] for a in api(url, "/automations/filter")}
    assert {"tessera-resume-crashed-training", "tessera-crash-unresponsive-flow-runs"} <= names, names

    started = subprocess.run([*PREFECT, "deployment", "run", "finetune/finetune", "--params", json.dumps(
        {"training_duration": "150ba", "register_to": "main.crash.bot", "training_config": {"checkpoint_every": 5}})],
        env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    [flow_run] = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id(env, "finetune/finetune")]}},
                                                "sort": "EXPECTED_START_TIME_DESC", "limit": 1})
    run_dir = Path(env["TESSERA_HOME"]) / "runs" / f"tiny-chat-{flow_run['id'].replace('-', '')[-6:]}"
    from tessera.core import checkpoints

    deadline = time.time() + 180
    while True:  # until it has a checkpoint, still training
        record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
        if record.get("checkpoint_dir") and checkpoints.latest(record["checkpoint_dir"]) and record["status"] == "RUNNING":
            break
        assert time.time() < deadline and record.get("status") not in ("COMPLETED", "FAILED"), (record, worker_log(env))
        time.sleep(0.5)
    os.kill(record["pid"], signal.SIGKILL)  # the flow run's process, on the worker

    deadline = time.time() + 240
    while (now := api(url, f"/flow_runs/{flow_run['id']}", method="GET"))["state"]["type"] != "COMPLETED":
        assert time.time() < deadline and now["state"]["type"] not in ("FAILED", "CANCELLED"), (now["state"], worker_log(env))
        time.sleep(1)
    assert now["run_count"] == 2, now["run_count"]
    states = [s["type"] for s in api(url, f"/flow_run_states/?flow_run_id={flow_run['id']}", method="GET")]
    assert "CRASHED" in states and states.index("CRASHED") < len(states) - 1 - states[::-1].index("SCHEDULED"), states
    name = run_dir.name
    status, events, steps, version = sdk(env, (
        f"r = fm.get('{name}'); from tessera.core.tracking import mlflow_client; "
        "steps = [m.step for m in mlflow_client().get_metric_history(r.run_id, 'loss')]; "
        f"print(json.dumps([r.status.value, [e['message'] for e in fm.get_events('{name}')], steps, r.registered_model_version]))"))
    assert status == "COMPLETED" and version == "models:/main.crash.bot/1", (status, events)
    assert sum(m.startswith("resumed from the checkpoint at step") for m in events) == 1, events
    assert sorted(steps) == list(range(5, 151, 5)), steps  # each logged step (every 5th) once, to the end
