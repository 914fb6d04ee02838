"""How data paths are classified, and the local sources: .jsonl files and folders of .txt documents."""

import os
from pathlib import Path

import pytest

from tessera.core.config import TaskType
from tessera.core.errors import ConfigError, DataValidationError, TesseraError
from tessera.core.records import valid_records
from tessera.core.sources import BadRecord, Record, classify, read_records, resolve_source

from conftest import chat, write_jsonl

CHAT, INSTRUCTION, PRETRAIN = TaskType.CHAT_COMPLETION, TaskType.INSTRUCTION_FINETUNE, TaskType.CONTINUED_PRETRAIN


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def volume(home) -> Path:
    path = home / "volumes" / "main" / "raw" / "docs"
    path.mkdir(parents=True)
    return path


def write_docs(folder: Path, docs: dict[str, str | bytes]) -> Path:
    for rel, content in docs.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


@pytest.mark.parametrize("path,kind", [
    ("dbfs:/Volumes/main/sales/raw/chat.jsonl", "local"),
    ("/Volumes/main/sales/raw", "local"),
    ("/data/chat.jsonl", "local"),
    ("./main.sales.chats", "local"),
    ("~/chat.jsonl", "local"),
    ("main.sales.chats", "delta"),
    ("main.sales.chats@v3", "delta"),
    ("main.sales.chats@7", "delta"),
    ("tatsu-lab/alpaca/train", "hf_dataset"),
    ("squad/validation", "hf_dataset"),
    ("data/chat.jsonl", "local"),  # a split is a plain word: a missing file is still a file
    ("main.sales", "local"),
    ("a/b/c/d", "local"),
])
def test_classification(in_tmp, path, kind):
    assert classify(path) == kind


def test_an_existing_local_path_wins_over_a_table_or_dataset_name(in_tmp):
    (in_tmp / "main.sales.chats").write_text("{}\n")
    (in_tmp / "org" / "name").mkdir(parents=True)
    (in_tmp / "org" / "name" / "train").write_text("{}\n")
    assert classify("main.sales.chats") == "local"
    assert classify("org/name/train") == "local"


@pytest.mark.parametrize("path", ["s3://bucket/chat.jsonl", "dbfs:/FileStore/chat.jsonl", "https://example.com/x.jsonl"])
def test_other_schemes_are_refused(in_tmp, path):
    with pytest.raises(TesseraError, match="unsupported location"):
        resolve_source(path, CHAT)


def test_a_jsonl_volume_file(home):
    path = write_jsonl(home / "volumes" / "main" / "sales" / "raw" / "chat.jsonl", [chat("q", "a"), "", chat("q2", "a2")])
    source = resolve_source("dbfs:/Volumes/main/sales/raw/chat.jsonl", CHAT)
    assert (source.kind, source.location) == ("jsonl", str(path))
    records = list(read_records(source))
    assert [r.where for r in records] == ["dbfs:/Volumes/main/sales/raw/chat.jsonl:1", "dbfs:/Volumes/main/sales/raw/chat.jsonl:3"]
    assert records[1].data == chat("q2", "a2")


def test_instruction_records_from_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "response": {"text": "r"}}])
    with pytest.raises(DataValidationError) as info:
        list(valid_records(str(path), INSTRUCTION))
    assert info.value.errors == [f"{path}:2: field 'response': expected a string, got dict"]


@pytest.mark.parametrize("task", [CHAT, INSTRUCTION])
def test_a_folder_is_refused_for_record_tasks(tmp_path, task):
    write_docs(tmp_path / "docs", {"a.txt": "text"})
    with pytest.raises(TesseraError, match=f"docs: is a folder; {task.value} data must be a .jsonl file"):
        resolve_source(str(tmp_path / "docs"), task)


def test_a_jsonl_file_is_refused_for_pretraining(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "t"}])
    with pytest.raises(TesseraError, match="docs.jsonl: is a file; CONTINUED_PRETRAIN data must be a folder of .txt files"):
        resolve_source(str(path), PRETRAIN)


def test_missing_file_or_folder(tmp_path):
    for task in (CHAT, PRETRAIN):
        with pytest.raises(TesseraError, match="nope: no such file or directory"):
            resolve_source(str(tmp_path / "nope"), task)


def test_text_folder_is_searched_recursively_and_other_files_are_ignored(home, volume):
    write_docs(volume, {
        "b.txt": "second", "a/deep/c.txt": "third", "a/first.txt": "first",
        "notes.md": "ignored", "data.jsonl": "{}", ".hidden.txt": "hidden", ".cache/x.txt": "hidden",
    })
    source = resolve_source("dbfs:/Volumes/main/raw/docs", PRETRAIN)
    assert source.kind == "text_folder"
    records = list(valid_records(source, PRETRAIN))
    assert [(r.where, r.data) for r in records] == [
        ("dbfs:/Volumes/main/raw/docs/a/deep/c.txt", {"text": "third"}),
        ("dbfs:/Volumes/main/raw/docs/a/first.txt", {"text": "first"}),
        ("dbfs:/Volumes/main/raw/docs/b.txt", {"text": "second"}),
    ]


def test_only_hidden_names_are_skipped_and_every_skipped_file_is_counted(tmp_path):
    folder = write_docs(tmp_path / "corpus", {
        "_thread.txt": "a thread", "__future__.txt": "the future", "_sub/x.txt": "in a folder named _sub",
        ".hidden.txt": "hidden", ".git/y.txt": "hidden", ".git/objects/z": "hidden", "notes.md": "not text",
    })
    os.symlink(folder / "_sub", folder / "linked")
    source = resolve_source(str(folder), PRETRAIN)
    assert [r.where.removeprefix(f"{folder}/") for r in read_records(source)] == ["__future__.txt", "_sub/x.txt", "_thread.txt"]
    assert source.skipped_files() == {
        "hidden file": 1, "in a hidden folder": 2, "link to a folder (not followed)": 1, "not a .txt file": 1,
    }
    assert resolve_source(str(write_jsonl(tmp_path / "c.jsonl", [chat("q", "a")])), CHAT).skipped_files() == {}


def test_a_folder_without_txt_files_is_refused_by_name(home, volume):
    write_docs(volume, {"a.md": "x", "sub/b.jsonl": "{}"})
    with pytest.raises(TesseraError, match="^/Volumes/main/raw/docs: no .txt files in this folder or its subfolders$"):
        resolve_source("/Volumes/main/raw/docs", PRETRAIN)


def test_undecodable_and_blank_documents_are_each_reported(home, volume):
    write_docs(volume, {"good.txt": "fine", "latin1.txt": "caf\xe9".encode("latin-1"), "blank.txt": " \n\n", "z.txt": b"\xff"})
    with pytest.raises(DataValidationError) as info:
        list(valid_records("/Volumes/main/raw/docs", PRETRAIN))
    assert info.value.errors == [
        "/Volumes/main/raw/docs/blank.txt: file is empty",
        "/Volumes/main/raw/docs/latin1.txt: not valid UTF-8 (byte 3)",
        "/Volumes/main/raw/docs/z.txt: not valid UTF-8 (byte 0)",
    ]


def test_empty_documents_are_refused_up_front(home, volume):
    write_docs(volume, {"good.txt": "fine", "a/empty.txt": "", "b.txt": ""})
    with pytest.raises(DataValidationError) as info:
        resolve_source("/Volumes/main/raw/docs", PRETRAIN)
    assert info.value.errors == ["/Volumes/main/raw/docs/a/empty.txt: file is empty", "/Volumes/main/raw/docs/b.txt: file is empty"]


def test_a_link_out_of_the_volume_is_refused(home, volume, tmp_path):
    write_docs(volume, {"a.txt": "inside"})
    secret = write_docs(tmp_path / "secret", {"s.txt": "outside"})
    os.symlink(secret / "s.txt", volume / "s.txt")
    with pytest.raises(TesseraError, match="docs/s.txt: resolves outside its volume"):
        resolve_source("/Volumes/main/raw/docs", PRETRAIN)


def test_a_plain_local_folder_works_too(tmp_path):
    write_docs(tmp_path / "corpus", {"x.txt": "one"})
    records = list(read_records(resolve_source(str(tmp_path / "corpus"), PRETRAIN)))
    assert records == [Record(f"{tmp_path}/corpus/x.txt", {"text": "one"})]


def test_text_folder_fingerprint_follows_names_and_content(tmp_path):
    folder = write_docs(tmp_path / "corpus", {"a.txt": "one", "sub/b.txt": "two", "ignored.md": "x"})
    source = resolve_source(str(folder), PRETRAIN)
    before = source.fingerprint()
    assert source.fingerprint() == before
    (folder / "ignored.md").write_text("changed")
    assert source.fingerprint() == before
    (folder / "sub" / "b.txt").write_text("TWO")
    changed = source.fingerprint()
    assert changed != before
    (folder / "sub" / "b.txt").rename(folder / "b.txt")
    renamed = source.fingerprint()
    assert renamed not in (before, changed)
    (folder / ".hidden.txt").write_text("not a document")
    assert source.fingerprint() == renamed
    (folder / "_new.txt").write_text("a document")
    assert source.fingerprint() != renamed


def test_jsonl_fingerprint_and_lineage(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat("q", "a")])
    source = resolve_source(str(path), CHAT)
    before = source.fingerprint()
    write_jsonl(path, [chat("q", "a"), chat("q", "b")])
    assert source.fingerprint() != before
    assert source.lineage() == {"source.path": str(path), "source.kind": "jsonl", "source.location": str(path)}


def test_a_version_is_only_for_tables(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat("q", "a")])
    with pytest.raises(TesseraError, match="a version can only be pinned for a Delta table"):
        resolve_source(str(path), CHAT, version=2)


@pytest.mark.parametrize("cluster", ["0123-456789-abcdef", "localhost:15002", "local[x]", "http://host:15002"])
def test_a_malformed_cluster_is_a_config_error(tmp_path, cluster):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat("q", "a")])
    with pytest.raises(ConfigError, match="expected a Spark Connect URL"):
        resolve_source(str(path), CHAT, cluster=cluster)


def test_bad_records_from_read_records_are_not_raised(tmp_path):
    """read_records reports what cannot be decoded; it is valid_records that raises."""
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b'"just a string"\n\xff\n')
    assert list(read_records(resolve_source(str(path), CHAT))) == [
        BadRecord(f"{path}:1", "expected a JSON object, got str"),
        BadRecord(f"{path}:2", "not valid UTF-8 (byte 0)"),
    ]
