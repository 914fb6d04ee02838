"""The register stage: a version per fine-tune under one registered model (or a model named after the run), lineage
tags, the `challenger` alias, pinned serving requirements, on the embedded store and on a real MLflow server."""

from __future__ import annotations

import re
import secrets
import uuid

import pytest

from tasks import log_model
from tasks.log_model import serving_requirements
from tasks.register import register_model
from tasks.train.stage import TrainedModel
from tessera.core import runs
from tessera.core.config import build_run_config

JSONL = "dbfs:/Volumes/main/default/raw/chat.jsonl"
HASH = "ab" * 32


def fine_tune(model_dir, register_to: str, *, losses=(2.0, 1.25), eval_loss=None, source=None, **kw):
    """A run record and an MLflow run standing for a finished training run (its loss history and the source params
    the train stage logs); returns the run's config and the TrainedModel the register stage gets."""
    from tessera.core.tracking import experiment_id, mlflow_client

    config = build_run_config(model="tessera/tiny-chat", train_data_path=kw.pop("train_data_path", JSONL),
                              register_to=register_to, **kw)
    runs.save(runs.RunRecord(config=config, created_at=runs.now()))
    client = mlflow_client()
    exp_id = experiment_id(client, config.experiment)
    run_id = client.create_run(exp_id, run_name=config.name).info.run_id
    for key, value in (source or {"source.kind": "jsonl", "source.fingerprint": HASH}).items():
        client.log_param(run_id, key, value)
    for step, loss in enumerate(losses):
        client.log_metric(run_id, "loss", loss, step=step)
    if eval_loss is not None:
        client.log_metric(run_id, "eval_loss", eval_loss, step=len(losses))
    return config, TrainedModel(model_dir=str(model_dir), experiment_id=exp_id, mlflow_run_id=run_id)


def register_twice(model_dir, name: str):
    """Two fine-tunes of one model into `name`: from a JSONL file, then from a Delta table with custom weights and
    eval data. Returns both configs and run ids."""
    first, trained1 = fine_tune(model_dir, name)
    second, trained2 = fine_tune(
        model_dir, name, losses=(1.5, 0.5), eval_loss=0.75, train_data_path="main.sales.chats@v3",
        custom_weights_path="/weights/ckpt", source={"source.kind": "delta", "source.version": "3", "source.fingerprint": "cd" * 32},
    )
    assert register_model.fn(first, trained1).uri == f"models:/{name}/1"
    assert register_model.fn(second, trained2).uri == f"models:/{name}/2"
    return (first, trained1.mlflow_run_id), (second, trained2.mlflow_run_id)


def check_versions(name: str, first, second) -> None:
    from tessera.core.tracking import mlflow_client

    client = mlflow_client()
    (config1, run1), (config2, run2) = first, second
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    assert client.get_model_version(name, "1").tags == {
        "base_model": "tessera/tiny-chat", "task_type": "CHAT_COMPLETION", "train_data_path": JSONL,
        "run_name": config1.name, "mlflow_run_id": run1, "train_data_content_hash": HASH, "train_loss": "1.25",
    }
    assert client.get_model_version(name, "2").tags == {
        "base_model": "tessera/tiny-chat", "task_type": "CHAT_COMPLETION", "train_data_path": "main.sales.chats@v3",
        "run_name": config2.name, "mlflow_run_id": run2, "train_data_version": "3", "custom_weights_path": "/weights/ckpt",
        "train_loss": "0.5", "eval_loss": "0.75",
    }
    assert {str(v.version): v.run_id for v in client.search_model_versions(f"name='{name}'")} == {"1": run1, "2": run2}
    for run_id in (run1, run2):
        assert client.get_run(run_id).info.status == "FINISHED"
    assert runs.load(config2.name).registered_version == f"models:/{name}/2"


def declared_requirements(model_uri: str) -> list[str]:
    import mlflow

    path = mlflow.pyfunc.get_model_dependencies(model_uri)
    return [line.strip() for line in open(path) if line.strip() and not line.startswith("#")]


def check_requirements(model_uri: str) -> None:
    declared = log_model.declared_packages()
    requirements = declared_requirements(model_uri)
    names = {log_model._canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}
    assert {"torch", "transformers", "tokenizers", "accelerate", "mlflow"} <= names, requirements
    assert names <= declared, requirements
    assert all("==" in r and "+" not in r for r in requirements), requirements


def test_same_fine_tune_twice_adds_version_2_with_challenger(home, tiny_model_dir):
    first, second = register_twice(tiny_model_dir, "main.test.support_bot")
    check_versions("main.test.support_bot", first, second)
    check_requirements("models:/main.test.support_bot@challenger")


def test_a_run_registering_again_gets_its_own_version_back_and_leaves_a_newer_challenger(home, tiny_model_dir):
    """A flow run that reaches the register stage again (rescheduled after a crash past it, or resumed after its
    deploy step failed) registers no second copy of the same weights."""
    from tessera.core.tracking import mlflow_client

    name, client = "main.test.again", mlflow_client()
    config, trained = fine_tune(tiny_model_dir, name)
    assert register_model.fn(config, trained).uri == f"models:/{name}/1"
    client.delete_registered_model_alias(name, "challenger")  # as if it crashed between making the version and the alias
    assert register_model.fn(config, trained).uri == f"models:/{name}/1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    assert runs.read_events(config.name)[-1]["message"] == f"models:/{name}/1 was registered by this run already: kept, nothing registered again"

    later, trained_later = fine_tune(tiny_model_dir, name, losses=(1.5, 0.5))
    assert register_model.fn(later, trained_later).uri == f"models:/{name}/2"
    assert register_model.fn(config, trained).uri == f"models:/{name}/1"  # the first run, once more
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"  # the newer run keeps it
    assert {str(v.version): v.run_id for v in client.search_model_versions(f"name='{name}'")} == {
        "1": trained.mlflow_run_id, "2": trained_later.mlflow_run_id}
    assert client.get_model_version(name, "1").tags["train_loss"] == "1.25"


def test_two_part_register_to_names_the_model_after_the_run(home, tiny_model_dir):
    from tessera.core.tracking import mlflow_client

    config, trained = fine_tune(tiny_model_dir, "main.test")
    assert re.fullmatch(r"tiny-chat-[0-9a-f]{6}", config.name)
    registered = register_model.fn(config, trained)
    assert (registered.name, registered.version) == (f"main.test.{config.name}", "1")
    client = mlflow_client()
    assert str(client.get_model_version_by_alias(registered.name, "challenger").version) == "1"
    assert client.get_model_version(registered.name, "1").tags["run_name"] == config.name


def test_serving_requirements_are_declared_and_public_versions(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda pkg: "2.13.0+cpu" if pkg == "torch" else real(pkg))
    monkeypatch.setattr(log_model, "SERVING_PACKAGES", (*log_model.SERVING_PACKAGES, "not-a-dependency"))
    requirements = serving_requirements()
    assert requirements[0] == "torch==2.13.0"
    assert [r.split("==")[0] for r in requirements] == ["torch", "transformers", "tokenizers", "accelerate"]
    assert all("+" not in r for r in requirements)
    assert "accelerate" in log_model.declared_packages()  # pyproject.toml declares what the model needs


def test_a_flow_run_without_run_name_is_named_after_its_model():
    flow_run_id = uuid.uuid4()
    name = runs.flow_run_name({"model": "tessera/tiny-chat", "register_to": "main.t"}, flow_run_id)
    assert name == f"tiny-chat-{flow_run_id.hex[-6:]}"
    assert runs.flow_run_name({"model": "tessera/tiny-chat"}, str(flow_run_id)) == name  # hooks and flow body agree
    assert runs.flow_run_name({"model": "tessera/tiny-chat", "run_name": "mine"}, flow_run_id) == "mine"


@pytest.mark.slow
def test_a_remote_tracking_server_registers_and_serves(home, tiny_model_dir, mlflow_server, monkeypatch, mlflow_store):
    from tasks.serve.loading import load_registered
    from tessera.core.tracking import mlflow_client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"main.remote.bot_{secrets.token_hex(3)}"  # the server lives for the whole session
    first, second = register_twice(tiny_model_dir, name)
    check_versions(name, first, second)
    client = mlflow_client()
    assert client.tracking_uri == mlflow_server
    assert client.get_run(second[1]).info.artifact_uri.startswith("mlflow-artifacts:")  # through the server
    # nothing went to the embedded store: the home's copy of the empty store is as it was
    assert (home / "mlflow" / "mlflow.db").read_bytes() == mlflow_store.read_bytes()
    check_requirements(f"models:/{name}@challenger")

    loaded = load_registered(f"models:/{name}@challenger")
    # a LoadedModel (model, tokenizer, task) since serving learned /v1/completions; a (model, tokenizer) pair before
    model, tokenizer = (loaded.model, loaded.tokenizer) if hasattr(loaded, "model") else loaded
    assert getattr(loaded, "task", "llm/v1/chat") == "llm/v1/chat"
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids.shape[1]
