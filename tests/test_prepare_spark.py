"""Data prep on Spark executors (mapInArrow): through a local Spark Connect server (Sail) and classic local Spark,
every source gives the same examples, counts and error messages as in-process prep, in the same prepared format."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from datasets import load_from_disk

from tasks.prepare.stage import prepare
from tessera.core.config import build_run_config
from tessera.core.errors import DataValidationError, TesseraError

from conftest import chat, write_jsonl
from test_prepare import unpack
from test_sources import write_docs
from test_sources_delta import chats, delete_rows_with_deletion_vector, write_table

pytestmark = pytest.mark.slow

CLASSIC = "local[2]"


@pytest.fixture(scope="module")
def sail() -> str:
    from pysail.spark import SparkConnectServer

    server = SparkConnectServer(ip="127.0.0.1", port=0)
    server.start(background=True)
    host, port = server.listening_address
    yield f"sc://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def classic() -> str:
    """Classic local Spark, started as Tessera starts it, cutting files into 4 kB partitions: errors and examples
    must come out right across many partitions."""
    from tessera.core.sources.spark import spark_session

    with spark_session(CLASSIC) as spark:
        spark.conf.set("spark.sql.files.maxPartitionBytes", "4096")
        yield CLASSIC
        spark.stop()


def config(data_path, task_type, cluster, context_length=64):
    return build_run_config(
        model="tessera/tiny-chat", train_data_path=str(data_path), register_to="main.t", task_type=task_type,
        context_length=context_length, data_prep_cluster_id=cluster,
    )


def prepared_rows(data_path, task_type, cluster):
    """(stats, rows, engine) of a fresh prepare; the cached result is removed, so the other engine does its own."""
    prepared = prepare(config(data_path, task_type, cluster))
    rows = list(load_from_disk(f"{prepared.path}/rows"))
    engine = json.loads((Path(prepared.path) / "manifest.json").read_text())["engine"]
    assert not prepared.reused
    shutil.rmtree(prepared.path)
    return prepared.stats, rows, engine


def assert_same_as_in_process(data_path, task_type, cluster, tokenizer):
    local, local_rows, local_engine = prepared_rows(data_path, task_type, None)
    spark, spark_rows, spark_engine = prepared_rows(data_path, task_type, cluster)
    assert (local_engine, spark_engine) == ("in-process", f"Spark at {cluster}")
    same = {"examples", "tokens", "trainable_tokens", "truncated", "dropped_without_trainable_tokens", "length_min",
            "length_mean", "length_p50", "length_p95", "length_max", "length_histogram"}
    assert spark.model_dump(include=same) == local.model_dump(include=same)
    assert spark.rows == len(spark_rows) and all(len(r["input_ids"]) <= 64 for r in spark_rows)
    if task_type == "CONTINUED_PRETRAIN":  # blocks of each partition's documents, which may arrive interleaved
        tokens = lambda rows: sorted(t for r in rows for t in r["input_ids"])  # noqa: E731
        assert tokens(spark_rows) == tokens(local_rows)
        assert spark.rows == local.rows and sum(len(r["input_ids"]) < 64 for r in spark_rows) <= 1
    else:
        assert sorted(unpack(spark_rows)) == sorted(unpack(local_rows))
    return spark


def errors_of(data_path, task_type, cluster) -> list[str]:
    with pytest.raises(DataValidationError) as info:
        prepare(config(data_path, task_type, cluster))
    return info.value.errors


# --- Spark Connect (Sail) ---------------------------------------------------------------------------------


def chat_records(n):
    return [chat(f"question {i} " + "why " * (i % 7), "answer " * (1 + i % 9) + str(i)) for i in range(n)]


@pytest.mark.parametrize("task_type", ["CHAT_COMPLETION", "INSTRUCTION_FINETUNE"])
def test_a_jsonl_file(home, sail, tokenizer, task_type):
    records = chat_records(400) if task_type == "CHAT_COMPLETION" else [
        {"prompt": f"Repeat {i}: ", "completion": f"{i} " * (1 + i % 20)} for i in range(400)
    ]
    path = write_jsonl(home / "volumes" / "main" / "raw" / "files" / "data.jsonl", records)
    stats = assert_same_as_in_process("/Volumes/main/raw/files/data.jsonl", task_type, sail, tokenizer)
    assert stats.examples == 400 and path.exists()


def test_a_text_folder(home, sail, tokenizer):
    write_docs(home / "volumes" / "main" / "raw" / "docs", {
        **{f"part{i % 3}/doc{i}.txt": f"Document {i}. " + "Tessera reads folders. " * (i % 11) for i in range(40)},
        "README.md": "not a document",
    })
    stats = assert_same_as_in_process("dbfs:/Volumes/main/raw/docs", "CONTINUED_PRETRAIN", sail, tokenizer)
    assert stats.examples == 40


def test_a_delta_table_at_a_pinned_version_with_deletion_vectors(home, sail, tokenizer):
    location = write_table(home / "warehouse" / "main" / "sales" / "chats", chats(30), configuration={"delta.enableDeletionVectors": "true"})
    delete_rows_with_deletion_vector(location, [1, 4])  # v1
    write_table(location, chats(5, start=100))  # v2
    v1 = assert_same_as_in_process("main.sales.chats@v1", "CHAT_COMPLETION", sail, tokenizer)
    v2 = assert_same_as_in_process("main.sales.chats", "CHAT_COMPLETION", sail, tokenizer)
    assert (v1.examples, v2.examples) == (28, 33)


def test_bad_records_are_named_exactly_as_in_process(home, sail):
    lines = [json.dumps(r) for r in chat_records(30_000)]  # a few MB: Sail reads it in several partitions
    for at, bad in [(1, "{oops"), (9_000, "[1, 2]"), (21_000, ""), (21_001, '{"messages": "no"}'), (29_999, '{"prompt": 1}')]:
        lines[at] = bad
    path = home / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    errors = errors_of(path, "CHAT_COMPLETION", sail)
    assert errors == errors_of(path, "CHAT_COMPLETION", None)
    assert [e.split(": ")[0] for e in errors] == [f"{path}:{n}" for n in (2, 9001, 21002, 30000)]

    write_table(home / "warehouse" / "main" / "s" / "docs", pa.table({"text": ["a document", None, "  ", "fine"]}))
    assert errors_of("main.s.docs", "CONTINUED_PRETRAIN", sail) == [
        "main.s.docs@v0 row 1: field 'text': expected a string, got null",
        "main.s.docs@v0 row 2: field 'text': is empty",
    ]
    assert list((home / "prepared").iterdir()) == []  # nothing half-written


def test_a_failed_read_names_the_source_and_the_server_serves_the_next(home, sail):
    """Sail refuses undecodable text outright (classic Spark passes the bytes through: see below)."""
    path = home / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff"}\n')
    with pytest.raises(TesseraError, match=f"^{path}: reading it \\(Spark at {sail}\\) failed: .*UTF-8"):
        prepare(config(path, "INSTRUCTION_FINETUNE", sail))
    path.write_text('{"prompt": "p", "response": "r"}\n')
    assert prepare(config(path, "INSTRUCTION_FINETUNE", sail)).stats.examples == 1


def test_dataset_splits_are_prepared_in_process_even_with_a_cluster(home, sail):
    from datasets import Dataset

    Dataset.from_dict({"messages": [chat("q", "a")["messages"]]}).save_to_disk(str(home / "datasets" / "acme" / "c" / "train"))
    _, rows, engine = prepared_rows("acme/c/train", "CHAT_COMPLETION", sail)
    assert engine == "in-process" and len(rows) == 1


def test_the_data_report_from_spark(home, sail):
    path = write_jsonl(home / "chat.jsonl", chat_records(50))
    result = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "validate", str(path), "--model", "tessera/tiny-chat", "--json",
         "--data-prep-cluster-id", sail],
        capture_output=True, text=True, env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["examples"] == 50
    manifests = [json.loads(m.read_text()) for m in (home / "prepared").glob("*/manifest.json")]
    assert manifests and all(m["engine"] == f"Spark at {sail}" for m in manifests)  # (and its repacking, at the fitted length)


def test_an_unreachable_server(home):
    path = write_jsonl(home / "chat.jsonl", [chat("q", "a")])
    with pytest.raises(TesseraError, match="data_prep_cluster_id sc://127.0.0.1:1: no Spark Connect server answers there"):
        prepare(config(path, "CHAT_COMPLETION", "sc://127.0.0.1:1"))


# --- classic Spark ----------------------------------------------------------------------------------------


def test_classic_jsonl_across_many_partitions(home, classic, tokenizer):
    lines = [json.dumps(r) for r in chat_records(300)]
    path = home / "volumes" / "main" / "sales" / "raw" / "chat.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 8 * 4096
    assert_same_as_in_process("dbfs:/Volumes/main/sales/raw/chat.jsonl", "CHAT_COMPLETION", classic, tokenizer)

    lines[3], lines[150], lines[299] = "", "{oops", "[1, 2]"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"messages": "\xff"}\n')
    errors = errors_of("dbfs:/Volumes/main/sales/raw/chat.jsonl", "CHAT_COMPLETION", classic)
    assert errors == errors_of("dbfs:/Volumes/main/sales/raw/chat.jsonl", "CHAT_COMPLETION", None)
    assert [e.rsplit(": ", 1)[0].split(":")[-1] for e in errors] == ["151", "300", "301"]
    assert errors[-1].endswith("301: not valid UTF-8 (byte 14)")


def test_classic_text_folder(home, classic, tokenizer):
    folder = home / "volumes" / "main" / "raw" / "docs"
    write_docs(folder, {f"x/d{i}.txt": f"Document {i}. " + "Some text. " * (i % 9) for i in range(20)})
    assert_same_as_in_process("/Volumes/main/raw/docs", "CONTINUED_PRETRAIN", classic, tokenizer)
    write_docs(folder, {"bad.txt": b"\xff\xfe", "blank.txt": "\n"})
    assert sorted(errors_of("/Volumes/main/raw/docs", "CONTINUED_PRETRAIN", classic)) == [
        "/Volumes/main/raw/docs/bad.txt: not valid UTF-8 (byte 0)",
        "/Volumes/main/raw/docs/blank.txt: file is empty",
    ]


def test_classic_delta_without_the_jars_is_refused_clearly(home, classic):
    write_table(home / "warehouse" / "main" / "s" / "t", pa.table({"text": ["doc"]}))
    with pytest.raises(TesseraError, match=r"main.s.t@v0: the Spark at local\[2\] has no Delta Lake reader .* leave data_prep_cluster_id unset"):
        prepare(config("main.s.t", "CONTINUED_PRETRAIN", classic))
    assert prepare(config("main.s.t", "CONTINUED_PRETRAIN", None)).stats.examples == 1


def test_one_process_holds_one_classic_session(home, classic):
    path = write_jsonl(home / "chat.jsonl", [chat("q", "a")])
    with pytest.raises(TesseraError, match=r"local\[1\]: this process already runs Spark at local\[2\]"):
        prepare(config(path, "CHAT_COMPLETION", "local[1]"))
