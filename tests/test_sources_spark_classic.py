"""Reading through classic Spark (`local[1]`): files stream back with their line numbers; Delta needs jars we never download."""

import pyarrow as pa
import pytest

from tessera.config import TaskType
from tessera.errors import TesseraError
from tessera.records import valid_records
from tessera.sources import read_records, resolve_source

from conftest import chat, write_jsonl
from test_sources import write_docs
from test_sources_delta import write_table

pytestmark = pytest.mark.slow

CHAT, PRETRAIN = TaskType.CHAT_COMPLETION, TaskType.CONTINUED_PRETRAIN
MASTER = "local[1]"


@pytest.fixture(scope="module")
def cluster() -> str:
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(MASTER).config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false").getOrCreate()
    )
    yield MASTER
    spark.stop()


def read(source, task, cluster=None) -> list[tuple[str, dict | str]]:
    return sorted((r.where, getattr(r, "data", None) or r.message) for r in read_records(source, task, cluster=cluster))


def test_a_jsonl_volume_file_with_bad_lines(home, cluster):
    path = write_jsonl(home / "volumes" / "main" / "sales" / "raw" / "chat.jsonl", [chat("q", "a"), "", "{oops", "[1, 2]", chat("q2", "a2")])
    with path.open("ab") as f:
        f.write(b'{"messages": "\xff"}\n')
    source = resolve_source("dbfs:/Volumes/main/sales/raw/chat.jsonl", CHAT, cluster=cluster)
    records = read(source, CHAT, cluster)
    assert records == read(source, CHAT)
    assert [(w.rsplit(":", 1)[1], type(d).__name__) for w, d in records] == [
        ("1", "dict"), ("3", "str"), ("4", "str"), ("5", "dict"), ("6", "str"),
    ]
    assert records[4][1] == "not valid UTF-8 (byte 14)"


def test_a_text_folder(home, cluster):
    write_docs(home / "volumes" / "main" / "raw" / "docs", {"a.txt": "one", "x/b.txt": "two", "c.md": "no", "blank.txt": "\n"})
    source = resolve_source("/Volumes/main/raw/docs", PRETRAIN, cluster=cluster)
    assert read(source, PRETRAIN, cluster) == read(source, PRETRAIN) == [
        ("/Volumes/main/raw/docs/a.txt", {"text": "one"}),
        ("/Volumes/main/raw/docs/blank.txt", "file is empty"),
        ("/Volumes/main/raw/docs/x/b.txt", {"text": "two"}),
    ]


def test_delta_without_the_jars_is_refused_clearly(home, cluster):
    write_table(home / "warehouse" / "main" / "s" / "t", pa.table({"text": ["doc"]}))
    source = resolve_source("main.s.t", PRETRAIN, cluster=cluster)
    with pytest.raises(TesseraError, match=r"main.s.t@v0: the Spark at local\[1\] has no Delta Lake reader .* leave data_prep_cluster_id unset"):
        list(valid_records(source, PRETRAIN, cluster=cluster))
    assert [r.data for r in valid_records(source, PRETRAIN)] == [{"text": "doc"}]


def test_one_process_holds_one_classic_session(tmp_path, cluster):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat("q", "a")])
    with pytest.raises(TesseraError, match=r"local\[2\]: this process already runs Spark at local\[1\]"):
        list(read_records(resolve_source(str(path), CHAT), CHAT, cluster="local[2]"))
