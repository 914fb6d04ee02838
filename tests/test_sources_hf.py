"""Hugging Face dataset splits, offline: a local dataset directory first, then the datasets cache."""

import shutil
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from tessera.core.config import TaskType
from tessera.core.errors import DataValidationError, TesseraError
from tessera.core.records import valid_records
from tessera.core.sources import hf_datasets, read_records, resolve_source

from conftest import chat

CHAT, INSTRUCTION, PRETRAIN = TaskType.CHAT_COMPLETION, TaskType.INSTRUCTION_FINETUNE, TaskType.CONTINUED_PRETRAIN


@pytest.fixture
def datasets_dir(home) -> Path:
    return home / "datasets"


@pytest.fixture
def chat_dataset(datasets_dir) -> Path:
    """acme/support: a DatasetDict with a 3-row train split (row 1 breaks the rules) and a test split."""
    train = [chat("q0", "a0")["messages"], [{"role": "user", "content": "q1"}], chat("q2", "a2")["messages"]]
    DatasetDict({
        "train": Dataset.from_dict({"messages": train, "id": [0, 1, 2]}),
        "test": Dataset.from_dict({"messages": [chat("t", "u")["messages"]], "id": [9]}),
    }).save_to_disk(str(datasets_dir / "acme" / "support"))
    return datasets_dir / "acme" / "support"


def test_a_saved_dataset_dict_split(chat_dataset):
    source = resolve_source("acme/support/test", CHAT)
    assert (source.kind, source.split, source.location) == ("hf_dataset", "test", str(chat_dataset / "test"))
    assert [(r.where, r.data) for r in valid_records(source, CHAT)] == [("acme/support/test row 0", chat("t", "u"))]
    assert source.lineage()["source.version"] == source.version  # the dataset's fingerprint
    assert source.fingerprint() == resolve_source("acme/support/test", CHAT).fingerprint()
    assert source.fingerprint() != resolve_source("acme/support/train", CHAT).fingerprint()


def test_bad_rows_are_named_by_their_index(chat_dataset):
    with pytest.raises(DataValidationError) as info:
        list(valid_records("acme/support/train", CHAT))
    assert info.value.errors == ["acme/support/train row 1: field 'messages': needs at least one 'assistant' message"]


def test_a_missing_split_lists_the_splits_there_are(chat_dataset):
    with pytest.raises(TesseraError, match=r"acme/support/validation: no split 'validation' in .*acme/support \(splits: train, test\)"):
        resolve_source("acme/support/validation", CHAT)


def test_a_missing_dataset(datasets_dir):
    with pytest.raises(TesseraError, match="acme/nothing/train: not a local file or folder, and no dataset 'acme/nothing'"):
        resolve_source("acme/nothing/train", CHAT)


def test_a_dataset_without_org_and_saved_split_by_split(datasets_dir, tmp_path, monkeypatch):
    root = tmp_path / "my-datasets"
    monkeypatch.setenv("TESSERA_DATASETS_ROOT", str(root))
    Dataset.from_dict({"prompt": ["p"], "response": ["r"]}).save_to_disk(str(root / "pairs" / "train"))
    Dataset.from_dict({"prompt": ["p"], "response": [""]}).save_to_disk(str(root / "pairs" / "eval"))
    assert [r.data for r in valid_records("pairs/train", INSTRUCTION)] == [{"prompt": "p", "response": "r"}]
    with pytest.raises(DataValidationError, match="pairs/eval row 0: field 'response': is empty"):
        list(valid_records("pairs/eval", INSTRUCTION))
    with pytest.raises(TesseraError, match=r"no split 'test' .*\(splits: eval, train\)"):
        resolve_source("pairs/test", INSTRUCTION)


def test_columns_are_checked_up_front(chat_dataset):
    with pytest.raises(TesseraError, match=r"acme/support/train: INSTRUCTION_FINETUNE data: no column 'prompt' \(columns: messages, id\)"):
        resolve_source("acme/support/train", INSTRUCTION)


def test_pretraining_from_a_dataset_with_a_text_column(datasets_dir):
    Dataset.from_dict({"content": ["doc a", "doc b", None]}).save_to_disk(str(datasets_dir / "corpus" / "train"))
    source = resolve_source("corpus/train", PRETRAIN, text_column="content")
    with pytest.raises(DataValidationError) as info:
        list(valid_records(source, PRETRAIN))
    assert info.value.errors == ["corpus/train row 2: field 'text': expected a string, got null"]
    assert [r.data for r in read_records(source)][:2] == [{"text": "doc a"}, {"text": "doc b"}]


def test_rows_stream_in_batches(datasets_dir, monkeypatch):
    Dataset.from_dict({"text": [f"doc {i}" for i in range(2500)]}).save_to_disk(str(datasets_dir / "big" / "train"))
    batch_sizes = []
    original = hf_datasets.batches_to_rows
    monkeypatch.setattr(hf_datasets, "batches_to_rows", lambda batches: original(batch_sizes.append(b.num_rows) or b for b in batches))
    records = read_records(resolve_source("big/train", PRETRAIN))
    assert next(records).data == {"text": "doc 0"} and sum(batch_sizes) <= 1024
    assert len(list(records)) == 2499 and max(batch_sizes) <= 1024


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """The datasets cache as `load_dataset("acme/cached")` leaves it after a download, with a train and a test split."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    data = tmp_path / "raw.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n')
    builder = Json(cache_dir=str(tmp_path / "build"), dataset_name="cached", data_files={"train": str(data), "test": str(data)})
    builder.download_and_prepare()
    cache = tmp_path / "hf-cache"
    shutil.copytree(builder.cache_dir, cache / "acme___cached" / "default" / "0.0.0" / "0123abcd")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_a_split_from_the_datasets_cache_offline(home, hub_cache):
    source = resolve_source("acme/cached/test", INSTRUCTION)
    assert source.location.startswith(str(hub_cache / "acme___cached"))
    assert [(r.where, r.data) for r in valid_records(source, INSTRUCTION)] == [("acme/cached/test row 0", {"prompt": "p", "completion": "c"})]
    with pytest.raises(TesseraError, match=r"acme/cached/dev: dataset 'acme/cached' has no split 'dev' \(splits: train, test\)"):
        resolve_source("acme/cached/dev", INSTRUCTION)
