"""Reading through Spark Connect (a local Sail server): the same records as in-process, from every source kind."""

import pyarrow as pa
import pytest

from tessera.config import TaskType
from tessera.errors import DataValidationError, TesseraError
from tessera.records import valid_records
from tessera.sources import read_records, resolve_source

from conftest import chat, write_jsonl
from test_sources import write_docs
from test_sources_delta import chats, delete_rows_with_deletion_vector, write_table

pytestmark = pytest.mark.slow

CHAT, INSTRUCTION, PRETRAIN = TaskType.CHAT_COMPLETION, TaskType.INSTRUCTION_FINETUNE, TaskType.CONTINUED_PRETRAIN


@pytest.fixture(scope="module")
def cluster() -> str:
    from pysail.spark import SparkConnectServer

    server = SparkConnectServer(ip="127.0.0.1", port=0)
    server.start(background=True)
    host, port = server.listening_address
    yield f"sc://{host}:{port}"
    server.stop()


def read(source, task, cluster=None) -> list[tuple[str, dict | str]]:
    """(where, data or message) of every record, sorted: engines may return rows in different orders."""
    return sorted((r.where, getattr(r, "data", None) or r.message) for r in read_records(source, task, cluster=cluster))


def test_a_delta_table_at_its_pinned_version(home, cluster):
    location = write_table(home / "warehouse" / "main" / "sales" / "chats", chats(3))
    write_table(location, chats(2, start=3))
    source = resolve_source("main.sales.chats@v0", CHAT, cluster=cluster)
    records = list(valid_records(source, CHAT, cluster=cluster))
    assert sorted(r.data["messages"][0]["content"] for r in records) == ["q0", "q1", "q2"]
    assert sorted(r.where for r in records) == [f"main.sales.chats@v0 row {i}" for i in range(3)]
    assert len(list(valid_records(resolve_source("main.sales.chats", CHAT), CHAT, cluster=cluster))) == 5


def test_deletion_vectors_are_applied(home, cluster):
    location = write_table(home / "warehouse" / "main" / "s" / "t", chats(5), configuration={"delta.enableDeletionVectors": "true"})
    delete_rows_with_deletion_vector(location, [0, 3])
    records = valid_records("main.s.t", CHAT, cluster=cluster)
    assert sorted(r.data["messages"][0]["content"] for r in records) == ["q1", "q2", "q4"]


def test_bad_rows_and_columns_read_by_spark(home, cluster):
    table = pa.table({"body": ["a document", None, "  "], "id": [1, 2, 3]})
    write_table(home / "warehouse" / "main" / "s" / "docs", table)
    source = resolve_source("main.s.docs", PRETRAIN, text_column="body", cluster=cluster)
    with pytest.raises(DataValidationError) as info:
        list(valid_records(source, PRETRAIN, cluster=cluster))
    assert sorted(e.split(": ", 1)[1] for e in info.value.errors) == ["field 'text': expected a string, got null", "field 'text': is empty"]
    assert all(e.startswith("main.s.docs@v0 row ") for e in info.value.errors)


def test_a_text_folder_gives_the_same_records_as_in_process(home, cluster):
    folder = home / "volumes" / "main" / "raw" / "docs"
    write_docs(folder, {"a.txt": "one", "sub/deeper/b.txt": "two", "bad.txt": b"\xff\xfe", "blank.txt": "  ", "skip.md": "x", "_x.txt": "hidden"})
    source = resolve_source("dbfs:/Volumes/main/raw/docs", PRETRAIN, cluster=cluster)
    assert read(source, PRETRAIN, cluster) == read(source, PRETRAIN)
    assert [w for w, _ in read(source, PRETRAIN, cluster)] == [
        f"dbfs:/Volumes/main/raw/docs/{rel}" for rel in ("a.txt", "bad.txt", "blank.txt", "sub/deeper/b.txt")
    ]


def test_a_jsonl_file_gives_the_same_records_as_in_process(tmp_path, cluster):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat("q", "a"), "", "[1]", "{oops", {"prompt": "p", "response": "r"}])
    source = resolve_source(str(path), INSTRUCTION, cluster=cluster)
    assert read(source, INSTRUCTION, cluster) == read(source, INSTRUCTION)
    assert [w for w, _ in read(source, INSTRUCTION, cluster)] == [f"{path}:{n}" for n in (1, 3, 4, 5)]


def test_an_engine_failure_names_the_source(tmp_path, cluster):
    """Sail refuses undecodable text outright (classic Spark passes the bytes through: see its tests)."""
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff"}\n')
    source = resolve_source(str(path), INSTRUCTION)
    with pytest.raises(TesseraError, match=f"^{path}: reading it \\(Spark at {cluster}\\) failed: .*UTF-8"):
        list(read_records(source, INSTRUCTION, cluster=cluster))


def test_dataset_splits_are_read_in_process_even_with_a_cluster(home, cluster):
    from datasets import Dataset

    Dataset.from_dict({"messages": [chat("q", "a")["messages"]]}).save_to_disk(str(home / "datasets" / "acme" / "c" / "train"))
    assert [r.data for r in valid_records("acme/c/train", CHAT, cluster=cluster)] == [chat("q", "a")]


def test_an_unreachable_server(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat("q", "a")])
    with pytest.raises(TesseraError, match="data_prep_cluster_id sc://127.0.0.1:1: no Spark Connect server answers there"):
        list(read_records(resolve_source(str(path), CHAT), CHAT, cluster="sc://127.0.0.1:1"))


def test_a_read_stopped_early_can_be_read_again(home, cluster):
    write_docs(home / "volumes" / "main" / "raw" / "many", {f"d{i:03}.txt": f"doc {i}" for i in range(50)})
    records = read_records(resolve_source("/Volumes/main/raw/many", PRETRAIN), PRETRAIN, cluster=cluster)
    assert next(records).data["text"].startswith("doc ")
    records.close()  # releases this read's session; the server stays up
    assert len(list(read_records(resolve_source("/Volumes/main/raw/many", PRETRAIN), PRETRAIN, cluster=cluster))) == 50
