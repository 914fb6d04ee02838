"""prefect.yaml as the README deploys it: a real Prefect server on 127.0.0.1, the `tessera` process pool created
first, `prefect deploy --all`, and a real process worker running a deployment run on a fresh home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
DEPLOYMENTS = {"finetune", "scheduled-retrain", "retrain-on-new-data", "deploy-endpoint", "watch-data"}


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port; yields the environment that points at it."""
    from tessera.endpoint import free_port

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_UI_ENABLED="false",
               TESSERA_HOME=str(home / "tessera"), PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5")
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


def test_prefect_deploy_all_makes_every_deployment_with_a_described_form(deployed):
    url = deployed["PREFECT_API_URL"]
    deployments = {d["name"]: d for d in api(url, "/deployments/filter")}
    assert DEPLOYMENTS <= set(deployments), sorted(deployments)

    for name in ("finetune", "scheduled-retrain", "retrain-on-new-data"):
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


def test_a_finetune_deployment_run_with_its_defaults_completes_on_a_worker(deployed):
    env = deployed
    worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "tessera"], cwd=REPO, env=env,
                              stdout=open(Path(env["TESSERA_HOME"]) / "worker.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        run = subprocess.run([*PREFECT, "deployment", "run", "finetune/finetune", "--param", "training_duration=2ba"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        url = env["PREFECT_API_URL"]
        with urllib.request.urlopen(f"{url}/deployments/name/finetune/finetune", timeout=30) as r:
            deployment_id = json.loads(r.read())["id"]
        deadline = time.time() + 360
        while True:
            flow_run = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}, "limit": 1})[0]
            state = flow_run["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.time() < deadline, (Path(env["TESSERA_HOME"]) / "worker.log").read_text()[-3000:]
            time.sleep(2)
        assert state == "COMPLETED", (Path(env["TESSERA_HOME"]) / "worker.log").read_text()[-3000:]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)

    # the run has a record under a model-based name, found by the SDK
    listing = subprocess.run([sys.executable, "-m", "tessera.cli", "runs", "list"], env=env, capture_output=True, text=True)
    assert "tiny-chat-" in listing.stdout and "COMPLETED" in listing.stdout, listing.stdout + listing.stderr
