"""The demo's path for real: a Prefect flow run in a detached process, torchrun, an MLflow store,
and a BentoML server on 127.0.0.1 answering over the OpenAI API."""

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import chat, write_jsonl

pytestmark = pytest.mark.slow

DATA = [
    chat("What colour is the sky?", "The sky is blue.", system="Answer in one sentence."),
    chat("Name a fruit.", "An apple is a fruit."),
    chat("What is Tessera?", "Tessera trains models on your data."),
    chat("Say hello.", "Hello from the test!"),
]


def wait_for(name: str, timeout: float = 420):
    from tessera import foundation_model as fm

    deadline = time.time() + timeout
    while time.time() < deadline:
        run = fm.get(name)
        if run.status.finished:
            return run
        time.sleep(1)
    raise AssertionError(f"run {name} did not finish in {timeout}s; events: {fm.get_events(name)[-5:]}")


def test_chat_data_in_a_volume_becomes_a_served_model(home):
    from openai import OpenAI

    from tessera import foundation_model as fm
    from tasks.serve.model_server import start_endpoint
    from tessera.core.tracking import mlflow_client as tracking_client

    write_jsonl(home / "volumes" / "main" / "default" / "raw" / "chat.jsonl", DATA)
    write_jsonl(home / "volumes" / "main" / "default" / "raw" / "eval.jsonl", DATA[:2])
    run = fm.create(
        model="tessera/tiny-chat",
        train_data_path="dbfs:/Volumes/main/default/raw/chat.jsonl",
        eval_data_path="dbfs:/Volumes/main/default/raw/eval.jsonl",
        eval_prompts=["What is Tessera?", "Say hello."],
        register_to="main.finetuning.support_bot",
        training_duration="150ba",
    )
    assert run.status.value in ("PENDING", "RUNNING")

    run = wait_for(run.name)
    assert run.status.value == "COMPLETED", run.details
    assert run.registered_model_version == "models:/main.finetuning.support_bot/1"

    # another process sees the same run and its status
    seen = subprocess.run(
        [sys.executable, "-c", f"from tessera import foundation_model as fm; print(fm.get('{run.name}').status.value)"],
        capture_output=True, text=True, env=os.environ.copy(), check=True,
    )
    assert seen.stdout.strip() == "COMPLETED"
    # and the Prefect server that records the runs (the session's, as a home's embedded one) shows the run's DAG
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tessera.core import runs as run_records

    flow_run_id = run_records.load(run.name).prefect_flow_run_id
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.type.value == "COMPLETED"
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert {t.name.rsplit("-", 1)[0] for t in tasks} == {"resolve-inputs", "prepare-data", "data-report", "train", "register-model"}
    assert [r.name for r in fm.list()] == [run.name]
    stages = {e["stage"] for e in fm.get_events(run.name)}
    assert {"run", "prepare", "train", "register"} <= stages

    client = tracking_client()
    losses = [m.value for m in sorted(client.get_metric_history(run.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) >= 10
    assert losses[-1] < losses[0] / 10, losses
    assert client.get_metric_history(run.run_id, "tokens_per_sec")
    eval_losses = [m.value for m in sorted(client.get_metric_history(run.run_id, "eval_loss"), key=lambda m: m.step)]
    assert len(eval_losses) == 3  # every 50 steps of 150
    assert eval_losses[-1] < eval_losses[0]
    assert client.get_metric_history(run.run_id, "eval_perplexity")
    artifacts = {a.path for a in client.list_artifacts(run.run_id, "data_report")}
    assert artifacts == {"data_report/report.json", "data_report/report.txt", "data_report/token_lengths.png"}
    table = json.loads(Path(client.download_artifacts(run.run_id, "eval_prompts.json")).read_text())  # MLflow's table
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["step"] for r in rows] == [50, 50, 100, 100, 150, 150]  # each evaluation and checkpoint, and the end
    assert [(r["prompt"], r["response"], r["finish_reason"]) for r in rows if r["step"] == 150] == [
        ("What is Tessera?", "Tessera trains models on your data.", "stop"), ("Say hello.", "Hello from the test!", "stop"),
    ]
    assert [c.step for c in fm.get_checkpoints(run.name)] == [50, 100, 150]  # short epochs: one per eval_every steps
    params = client.get_run(run.run_id).data.params
    assert params["data.examples"] == "4" and params["source.kind"] == "jsonl"
    version = client.get_model_version("main.finetuning.support_bot", "1")
    data_file = home / "volumes" / "main" / "default" / "raw" / "chat.jsonl"
    assert version.tags == {
        "base_model": "tessera/tiny-chat",
        "task_type": "CHAT_COMPLETION",
        "train_data_path": "dbfs:/Volumes/main/default/raw/chat.jsonl",
        "train_data_content_hash": hashlib.sha256(data_file.read_bytes()).hexdigest(),
        "run_name": run.name,
        "mlflow_run_id": run.run_id,
        "train_loss": f"{losses[-1]:.6g}",
        "eval_loss": f"{eval_losses[-1]:.6g}",
    }
    assert str(client.get_model_version_by_alias("main.finetuning.support_bot", "challenger").version) == "1"

    with start_endpoint(run.registered_model_version, log_file=home / "endpoint.log") as endpoint:
        openai = OpenAI(base_url=f"{endpoint.url}/v1", api_key="unused")
        for record in DATA:
            reply = openai.chat.completions.create(
                model="support_bot", messages=record["messages"][:-1], temperature=0, max_tokens=40
            )
            assert reply.choices[0].message.content == record["messages"][-1]["content"]
            assert reply.choices[0].finish_reason == "stop"  # it learned to end its turn
        with urllib.request.urlopen(f"{endpoint.url}/readyz") as health:
            assert health.status == 200
    with pytest.raises(OSError):  # stopped: nothing of it still answers
        urllib.request.urlopen(f"{endpoint.url}/readyz", timeout=2)
    # `tessera serve` of an alias behind an API key: tests/test_endpoints.py


def test_a_malformed_line_fails_the_run_with_path_and_line_and_registers_nothing(home):

    from tessera.core.tracking import mlflow_client as tracking_client

    path = write_jsonl(home / "volumes" / "main" / "default" / "raw" / "chat.jsonl", [
        DATA[0], '{"messages": [{"role": "user", "content": "unterminated"', DATA[1],
    ])
    result = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "create", "--model", "tessera/tiny-chat",
         "--train-data-path", "/Volumes/main/default/raw/chat.jsonl", "--register-to", "main.finetuning.bad", "--wait"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=300,
    )
    assert result.returncode != 0
    assert "/Volumes/main/default/raw/chat.jsonl:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_text().count("\n") == 3  # the user's file is untouched
    client = tracking_client()
    assert [m.name for m in client.search_registered_models()] == []


def test_cli_user_errors_exit_non_zero_without_traceback(home):
    result = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "create", "--model", "tessera/tiny-chat",
         "--train-data-path", "/Volumes/main/x", "--register-to", "main.finetuning"],
        capture_output=True, text=True, env=os.environ.copy(),
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: /Volumes/main/x: a volume path needs")
    assert "Traceback" not in result.stderr


def test_cancel_stops_the_flow_and_torchrun_and_registers_nothing(home):

    from tessera import foundation_model as fm
    from tessera.core.tracking import mlflow_client as tracking_client
    from tessera.core import runs
    from tessera.core.processes import process_alive

    path = write_jsonl(home / "chat.jsonl", DATA)
    run = fm.create(model="tessera/tiny-chat", train_data_path=str(path), register_to="main.finetuning.never",
                    training_duration="1_000_000ba")
    deadline = time.time() + 240
    while not any(e["stage"] == "train" for e in fm.get_events(run.name)):
        assert time.time() < deadline and not fm.get(run.name).status.finished, fm.get_events(run.name)
        time.sleep(1)
    record_pid = runs.load(run.name).pid
    fm.cancel(run.name)
    assert fm.get(run.name).status.value == "STOPPED"
    deadline = time.time() + 30
    while process_alive(record_pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not process_alive(record_pid)
    job_file = str(runs.job_file(run.name))
    workers = subprocess.run(["pgrep", "-f", job_file], capture_output=True, text=True).stdout.split()
    assert workers == []
    assert tracking_client().search_registered_models() == []
    with pytest.raises(Exception, match="already finished"):
        fm.cancel(run.name)


def test_an_fsdp_run_trains_registers_and_serves_the_answers_of_the_same_run_with_ddp(home):
    """fm.create with parallelism fsdp over 2 processes: the flow trains (sharded), writes the model whole, registers
    it and serves it (serve_to). Its weights are the DDP run's (fp32 on both sides), and its endpoint answers, greedy,
    on prompts neither run trained on, what the DDP run's trainer answered with its final weights (its eval-prompt
    generations: the trainer and the endpoint render and stop alike, tests/test_serve.py)."""
    import mlflow
    import torch
    from openai import OpenAI
    from safetensors.torch import load_file

    from tasks.serve import endpoints
    from tessera import foundation_model as fm
    from tessera.core.tracking import mlflow_client

    path = write_jsonl(home / "chat.jsonl", DATA)
    prompts = ["Tell me about the sea.", "What is two plus two?", "Write a word."]
    started = {
        kind: fm.create(model="tessera/tiny-chat", train_data_path=str(path), register_to=f"main.finetuning.{kind}",
                        eval_prompts=prompts, training_duration="12ba", learning_rate=2e-3,
                        serve_to="sharded" if kind == "fsdp" else None,
                        training_config={"parallelism": kind, "nproc_per_node": 2, "precision": "fp32"})
        for kind in ("fsdp", "ddp")
    }
    try:
        done = {kind: wait_for(run.name) for kind, run in started.items()}
        client = mlflow_client()
        for kind, run in done.items():
            assert run.status.value == "COMPLETED", (kind, run.details)
            assert client.get_run(run.run_id).data.params["train.parallelism"] == kind
        assert {k: r.registered_model_version for k, r in done.items()} == {
            "fsdp": "models:/main.finetuning.fsdp/1", "ddp": "models:/main.finetuning.ddp/1"}

        folders = {kind: mlflow.artifacts.download_artifacts(run.registered_model_version, dst_path=str(home / kind))
                   for kind, run in done.items()}
        weights = {kind: load_file(next(Path(folder).rglob("model.safetensors"))) for kind, folder in folders.items()}
        assert weights["fsdp"].keys() == weights["ddp"].keys()
        base = load_file(str(home / "models" / "tiny-chat" / "model.safetensors"))
        moved = max((weights["ddp"][k] - base[k]).abs().max().item() for k in base)
        apart = max((weights["fsdp"][k] - weights["ddp"][k]).abs().max().item() for k in base)
        assert moved > 1e-2 and apart < 1e-4, (moved, apart)  # trained, and trained alike
        assert all(weights["fsdp"][k].dtype == base[k].dtype == torch.float32 for k in base)

        table = json.loads(Path(client.download_artifacts(done["ddp"].run_id, "eval_prompts.json")).read_text())
        final = [dict(zip(table["columns"], row)) for row in table["data"] if row[table["columns"].index("step")] == 12]
        ddp_answers = [(r["prompt"], r["response"], r["finish_reason"]) for r in final]
        assert [p for p, _, _ in ddp_answers] == prompts and any(r for _, r, _ in ddp_answers), ddp_answers

        sharded = endpoints.get("sharded")
        assert sharded.status is endpoints.EndpointStatus.READY and sharded.model_uri == "models:/main.finetuning.fsdp/1"
        openai = OpenAI(base_url=f"{sharded.local_url}/v1", api_key="unused")
        served = []
        for prompt in prompts:
            choice = openai.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                    temperature=0, max_tokens=64).choices[0]
            served.append((prompt, choice.message.content, choice.finish_reason))
        assert served == ddp_answers
    finally:
        try:
            endpoints.stop("sharded")
        except Exception:  # noqa: BLE001 - never started
            pass
