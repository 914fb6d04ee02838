"""Delta tables read in-process with deltalake: name -> location, pinned versions, columns, deletion vectors."""

import base64
import json
import struct
import time
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from tessera.core.config import TaskType
from tessera.core.errors import DataValidationError, TesseraError
from tessera.core.records import valid_records
from tessera.core.sources import delta, read_records, resolve_source

from conftest import chat

CHAT, INSTRUCTION, PRETRAIN = TaskType.CHAT_COMPLETION, TaskType.INSTRUCTION_FINETUNE, TaskType.CONTINUED_PRETRAIN


def chats(n: int, start: int = 0) -> pa.Table:
    ids = range(start, start + n)
    return pa.table({"id": list(ids), "messages": [chat(f"q{i}", f"a{i}")["messages"] for i in ids]})


def write_table(location: Path, table: pa.Table, mode: str = "append", **kw) -> Path:
    write_deltalake(str(location), table, mode=mode, **kw)
    return location


def z85(data: bytes) -> str:
    """Z85 (the encoding of inline deletion vectors): base85 with another alphabet."""
    b85 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~"
    z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
    return base64.b85encode(data + b"\0" * (-len(data) % 4)).decode().translate(str.maketrans(b85, z85))


def delete_rows_with_deletion_vector(location: Path, rows: list[int]) -> None:
    """Commit a deletion vector on the table's first file, as Spark's DELETE does (deltalake rewrites files instead).

    The vector is inline: the magic number, then a portable RoaringBitmapArray of one bitmap (high
    bits 0) with one array container (key 0) holding `rows` (each < 65536).
    """
    log = location / "_delta_log"
    add = next(a["add"] for a in map(json.loads, (log / f"{0:020d}.json").read_text().splitlines()) if "add" in a)
    rows = sorted(rows)
    bitmap = struct.pack("<IIHHI", 12346, 1, 0, len(rows) - 1, 16) + struct.pack(f"<{len(rows)}H", *rows)
    data = struct.pack("<iqI", 1681511377, 1, 0) + bitmap
    vector = {"storageType": "i", "pathOrInlineDv": z85(data), "sizeInBytes": len(data), "cardinality": len(rows)}
    now = int(time.time() * 1000)
    actions = [
        {"commitInfo": {"timestamp": now, "operation": "DELETE"}},
        {"remove": {"path": add["path"], "dataChange": True, "deletionTimestamp": now, "extendedFileMetadata": True,
                    "partitionValues": {}, "size": add["size"]}},
        {"add": {**add, "modificationTime": now, "deletionVector": vector}},
    ]
    version = DeltaTable(str(location)).version() + 1
    (log / f"{version:020d}.json").write_text("".join(json.dumps(a) + "\n" for a in actions))


@pytest.fixture
def warehouse(home) -> Path:
    return home / "warehouse"


@pytest.fixture
def chats_table(warehouse) -> Path:
    """main.sales.chats: v0 has 3 conversations, v1 appends 2 more."""
    location = write_table(warehouse / "main" / "sales" / "chats", chats(3))
    return write_table(location, chats(2, start=3))


def test_the_latest_version_is_pinned_and_recorded(chats_table):
    source = resolve_source("main.sales.chats", CHAT)
    assert (source.kind, source.location, source.version) == ("delta", str(chats_table), 1)
    write_table(chats_table, chats(5, start=10))  # lands after the run started: not read
    records = list(valid_records(source, CHAT))
    assert len(records) == 5
    assert sorted(r.data["messages"][0]["content"] for r in records) == ["q0", "q1", "q2", "q3", "q4"]
    assert {r.where for r in records} == {f"main.sales.chats@v1 row {i}" for i in range(5)}
    assert source.lineage() == {
        "source.path": "main.sales.chats", "source.kind": "delta", "source.location": str(chats_table),
        "source.version": "1", "source.columns": "messages",
    }


@pytest.mark.parametrize("path,kw", [("main.sales.chats@v0", {}), ("main.sales.chats@0", {}), ("main.sales.chats", {"version": 0})])
def test_a_named_version_is_read(chats_table, path, kw):
    source = resolve_source(path, CHAT, **kw)
    assert source.version == 0
    assert sorted(r.data["messages"][0]["content"] for r in valid_records(source, CHAT)) == ["q0", "q1", "q2"]


def test_version_errors(chats_table):
    with pytest.raises(TesseraError, match=r"main.sales.chats: no version 7 \(the latest is 1\)"):
        resolve_source("main.sales.chats@v7", CHAT)
    with pytest.raises(TesseraError, match="names version 0 but version=1 was given"):
        resolve_source("main.sales.chats@v0", CHAT, version=1)


def test_fingerprint_is_location_and_version(chats_table, monkeypatch):
    latest, first = resolve_source("main.sales.chats", CHAT), resolve_source("main.sales.chats@v0", CHAT)
    monkeypatch.setattr(DeltaTable, "__init__", lambda *a, **k: pytest.fail("fingerprint opened the table"))
    assert latest.fingerprint() == latest.model_copy().fingerprint() != first.fingerprint()


def test_a_missing_table_names_where_it_looked(warehouse):
    with pytest.raises(TesseraError, match=f"main.sales.nope: not a local file or folder, and no Delta table main.sales.nope at {warehouse}/main/sales/nope"):
        resolve_source("main.sales.nope", CHAT)


def test_the_catalog_config_maps_names_to_locations(home, tmp_path, monkeypatch):
    write_table(tmp_path / "elsewhere" / "t", chats(2))
    write_table(tmp_path / "conf" / "t", chats(1))
    (home / "catalog.yaml").write_text("tables:\n  main.sales.chats: ../elsewhere/t\n")
    source = resolve_source("main.sales.chats", CHAT)  # $TESSERA_HOME/catalog.yaml; relative to its folder
    assert source.location == str(tmp_path / "elsewhere" / "t")
    assert len(list(valid_records(source, CHAT))) == 2

    config = tmp_path / "conf" / "catalog.yaml"
    config.write_text(f"tables:\n  main.sales.chats: t\n  main.sales.url: file://{tmp_path}/elsewhere/t\n")
    monkeypatch.setenv("TESSERA_CATALOG_CONFIG", str(config))
    assert resolve_source("main.sales.chats", CHAT).location == str(tmp_path / "conf" / "t")
    assert resolve_source("main.sales.url", CHAT).location == str(tmp_path / "elsewhere" / "t")

    monkeypatch.setenv("TESSERA_CATALOG_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(TesseraError, match="TESSERA_CATALOG_CONFIG=.*missing.yaml: no such file"):
        resolve_source("main.sales.chats", CHAT)


def test_a_broken_catalog_config_is_named(home):
    (home / "catalog.yaml").write_text("tables: [main.sales.chats\n")
    with pytest.raises(TesseraError, match="catalog.yaml: not a catalog config"):
        resolve_source("main.sales.chats", CHAT)


@pytest.mark.parametrize("task,table,expected", [
    (CHAT, pa.table({"text": ["x"]}), "main.s.t@v0: CHAT_COMPLETION data: no column 'messages' (columns: text)"),
    (CHAT, pa.table({"messages": ["[]"]}), "column 'messages' must be array<struct<role: string, content: string>>, not string"),
    (CHAT, pa.table({"messages": [[[{"role": "user", "content": "q"}]]]}), "column 'messages' must be array<struct"),
    (CHAT, pa.table({"messages": [[{"role": "user", "text": "q"}]]}), "column 'messages' must be array<struct"),
    (INSTRUCTION, pa.table({"prompt": ["p"]}), "no column 'response' (or 'completion') (columns: prompt)"),
    (INSTRUCTION, pa.table({"prompt": ["p"], "response": ["r"], "completion": ["c"]}), "needs a 'response' or a 'completion' column, not both"),
    (INSTRUCTION, pa.table({"prompt": [1], "response": ["r"]}), "column 'prompt' must be string, not int64"),
    (PRETRAIN, pa.table({"body": ["b"]}), "no column 'text' (columns: body)"),
])
def test_columns_that_cannot_hold_the_records_are_refused_up_front(warehouse, task, table, expected):
    write_table(warehouse / "main" / "s" / "t", table)
    with pytest.raises(TesseraError) as info:
        resolve_source("main.s.t", task)
    assert expected in str(info.value)


def test_instruction_table_with_completion_and_extra_columns(warehouse):
    write_table(warehouse / "main" / "s" / "pairs", pa.table({"id": [1, 2], "prompt": ["p1", "p2"], "completion": ["c1", "c2"]}))
    source = resolve_source("main.s.pairs", INSTRUCTION)
    assert source.fields == {"prompt": "prompt", "completion": "completion"}
    assert sorted(r.data["completion"] for r in valid_records(source, INSTRUCTION)) == ["c1", "c2"]


def test_pretraining_text_column_is_configurable(warehouse):
    write_table(warehouse / "main" / "s" / "docs", pa.table({"body": ["doc one", "doc two"]}))
    source = resolve_source("main.s.docs", PRETRAIN, text_column="body")
    assert source.lineage()["source.columns"] == "text=body"
    assert sorted(r.data["text"] for r in valid_records(source, PRETRAIN)) == ["doc one", "doc two"]


def test_bad_rows_name_the_table_version_row_and_field(warehouse):
    messages = [chat("q", "a")["messages"], [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], None]
    write_table(warehouse / "main" / "s" / "t", pa.table({"messages": messages}))
    with pytest.raises(DataValidationError) as info:
        list(valid_records("main.s.t", CHAT))
    assert info.value.errors == [
        "main.s.t@v0 row 1: messages[1].role: 'bot' is not one of system, user, assistant",
        "main.s.t@v0 row 2: field 'messages': expected a list of messages, got null",
    ]


def test_an_empty_table_has_no_records(warehouse):
    write_table(warehouse / "main" / "s" / "t", pa.table({"text": pa.array([], pa.string())}))
    with pytest.raises(TesseraError, match="^main.s.t@v0: contains no records$"):
        list(valid_records("main.s.t", PRETRAIN))


def test_removed_files_are_never_read(warehouse):
    location = write_table(warehouse / "main" / "s" / "t", chats(4))
    write_table(location, chats(1, start=100), mode="overwrite")
    DeltaTable(str(location)).delete("id = 100")  # rewrites: v2 has no live rows from either file
    write_table(location, chats(2, start=200))
    assert len(list(location.glob("*.parquet"))) >= 3
    records = list(valid_records("main.s.t", CHAT))
    assert sorted(r.data["messages"][0]["content"] for r in records) == ["q200", "q201"]


def test_deletion_vectors_are_applied(warehouse):
    location = write_table(warehouse / "main" / "s" / "t", chats(6), configuration={"delta.enableDeletionVectors": "true"})
    delete_rows_with_deletion_vector(location, [1, 4])
    source = resolve_source("main.s.t", CHAT)
    assert source.version == 1
    contents = [r.data["messages"][0]["content"] for r in valid_records(source, CHAT)]
    assert contents == ["q0", "q2", "q3", "q5"]
    assert [r.data["messages"][0]["content"] for r in valid_records("main.s.t@v0", CHAT)] == [f"q{i}" for i in range(6)]


def test_large_tables_stream_in_bounded_batches(warehouse, monkeypatch):
    """Rows arrive batch by batch; nothing reads the whole table into one Arrow table."""
    n = 3000
    write_table(warehouse / "main" / "s" / "docs", pa.table({"text": [f"document {i}" for i in range(n)]}))
    monkeypatch.setattr(DeltaTable, "to_pyarrow_table", lambda *a, **k: pytest.fail("read the whole table"))
    batch_sizes = []
    original = delta.batches_to_rows

    def counting(batches):
        return original(batch_sizes.append(b.num_rows) or b for b in batches)

    monkeypatch.setattr(delta, "batches_to_rows", counting)
    records = read_records(resolve_source("main.s.docs", PRETRAIN))
    first = next(records)
    assert first.where == "main.s.docs@v0 row 0" and batch_sizes == [1024]
    rest = list(records)
    assert len(rest) == n - 1 and max(batch_sizes) <= 1024 and sum(batch_sizes) == n
    assert [r.data["text"] for r in [first, *rest]] == [f"document {i}" for i in range(n)]


def test_the_row_order_is_stable_for_a_version(warehouse):
    location = warehouse / "main" / "s" / "t"
    for k in range(4):
        write_table(location, chats(3, start=10 * k))
    read = lambda: [(r.where, r.data["messages"][0]["content"]) for r in valid_records("main.s.t@v3", CHAT)]  # noqa: E731
    assert read() == read()
