"""Every source x task type trains end to end through the real flow (in-process Prefect, torchrun,
MLflow), and the MLflow run records exactly which data it read."""

import pyarrow as pa
import pytest
from datasets import Dataset, DatasetDict
from deltalake import write_deltalake

from conftest import chat, write_jsonl

pytestmark = pytest.mark.slow

CHAT = [chat(f"question {i}?", f"answer {i}.") for i in range(6)]
INSTRUCTION = [{"prompt": f"Repeat {i}: ", "response": f"{i} {i} {i}"} for i in range(6)]
PRETRAIN = [{"text": f"Document {i}. " + "Tessera trains models on your own data. " * (5 + i)} for i in range(6)]
RECORDS = {"CHAT_COMPLETION": CHAT, "INSTRUCTION_FINETUNE": INSTRUCTION, "CONTINUED_PRETRAIN": PRETRAIN}


@pytest.fixture(scope="module")
def spark_connect():
    from pysail.spark import SparkConnectServer

    server = SparkConnectServer(ip="127.0.0.1", port=0)
    server.start(background=True)
    host, port = server.listening_address
    yield f"sc://{host}:{port}"
    server.stop()


def write_source(home, kind: str, task: str) -> str:
    """The task's records written as `kind`; returns the data path a user would pass."""
    records = RECORDS[task]
    if kind == "jsonl":
        write_jsonl(home / "volumes" / "main" / "default" / "raw" / "data.jsonl", records)
        return "/Volumes/main/default/raw/data.jsonl"
    if kind == "text_folder":
        folder = home / "volumes" / "main" / "default" / "docs"
        for i, r in enumerate(records):
            (folder / f"part{i % 2}").mkdir(parents=True, exist_ok=True)
            (folder / f"part{i % 2}" / f"doc{i}.txt").write_text(r["text"])
        (folder / "README.md").write_text("ignored: not a .txt file")
        return "dbfs:/Volumes/main/default/docs"
    if kind == "delta":
        location = str(home / "warehouse" / "main" / "sales" / "data")
        write_deltalake(location, pa.Table.from_pylist(records[:3]))
        write_deltalake(location, pa.Table.from_pylist(records[3:]), mode="append")  # version 1
        return "main.sales.data"
    if kind == "hf_dataset":
        DatasetDict({"train": Dataset.from_list(records)}).save_to_disk(str(home / "datasets" / "acme" / "data"))
        return "acme/data/train"
    raise AssertionError(kind)


def train(home, name: str, data_path: str, task: str, cluster: str | None = None):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.finetune import finetune
    from tessera.core.paths import apply_engine_defaults
    from tessera.core.tracking import mlflow_client as tracking_client

    apply_engine_defaults()
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        uri = finetune(
            model="tessera/tiny-chat", train_data_path=data_path, register_to=f"main.e2e.{name}", task_type=task,
            training_duration="3ba", data_prep_cluster_id=cluster, run_name=name,
        )
    assert uri == f"models:/main.e2e.{name}/1"
    client = tracking_client()
    version = client.get_model_version(f"main.e2e.{name}", "1")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 1
    return run.data.params, version.tags


# Each source kind once through the whole flow, the three task types among them (test_delta_on_spark_connect and
# test_jsonl_on_classic_spark add chat data from Delta and JSONL); what each kind reads for each task type is
# tested at the source level (tests/test_sources*.py), where it costs no training run.
@pytest.mark.parametrize("kind,task", [
    ("jsonl", "INSTRUCTION_FINETUNE"),
    ("text_folder", "CONTINUED_PRETRAIN"),
    ("delta", "CONTINUED_PRETRAIN"),
    ("hf_dataset", "CHAT_COMPLETION"),
])
def test_in_process(home, kind, task):
    params, tags = train(home, f"{kind}_{task.lower()}", write_source(home, kind, task), task)
    assert params["source.kind"] == kind
    assert params["data.examples"] == "6"
    assert params["task_type"] == task
    if kind == "delta":
        assert params["source.version"] == "1"  # the latest version when the run started, recorded for lineage
        assert tags["train_data_path"] == "main.sales.data@v1"


def test_delta_on_spark_connect(home, spark_connect):
    params, tags = train(home, "delta_on_spark", write_source(home, "delta", "CHAT_COMPLETION"), "CHAT_COMPLETION", spark_connect)
    assert params["source.kind"] == "delta" and params["source.version"] == "1"
    assert params["data.examples"] == "6"


def test_jsonl_on_classic_spark(home):
    params, _ = train(home, "jsonl_on_spark", write_source(home, "jsonl", "CHAT_COMPLETION"), "CHAT_COMPLETION", "local[1]")
    assert params["source.kind"] == "jsonl" and params["data.examples"] == "6"


def test_an_unchanged_rerun_reuses_the_prepared_data(home, capfd, caplog):
    from tessera.core import runs

    data_path = write_source(home, "jsonl", "INSTRUCTION_FINETUNE")
    first, _ = train(home, "first", data_path, "INSTRUCTION_FINETUNE")
    capfd.readouterr()
    caplog.clear()
    again, _ = train(home, "again", data_path, "INSTRUCTION_FINETUNE")
    assert (first["prepared_data.reused"], again["prepared_data.reused"]) == ("False", "True")
    assert again["prepared_data.cache_key"] == first["prepared_data.cache_key"]
    prepared = home / "prepared" / first["prepared_data.cache_key"]
    # Prefect's log lines reach stderr, or pytest's log capture once an earlier test configured logging
    assert f"reusing prepared data {prepared}" in capfd.readouterr().err + caplog.text
    [event] = [e["message"] for e in runs.read_events("again") if e["stage"] == "prepare"]
    assert event.startswith(f"reused {data_path}: 6 examples")
