"""Data prep streams: rows come out while the input is still being read, a bounded piece at a time.

Peak memory on a large file is measured in bench/prep.py; here the bound is checked as behaviour:
how far ahead of the rows written the reader has got.
"""

import threading
import time

import pytest

import tasks.prepare.packing as packing
import tasks.prepare.pipeline as pipeline
from tasks.prepare.pipeline import Tally, map_ahead, stream_rows
from tasks.prepare.stage import prepare, with_progress
from tessera.core.config import TaskType, build_run_config
from tessera.core.errors import DataValidationError
from tessera.core.sources import Record

from conftest import chat, write_jsonl


def records_that_refuse_to_be_read_far_ahead(make, limit: int, pulled: list):
    """An input far larger than memory would hold; reading more than `limit` records fails the test."""
    for i in range(10 * limit):
        if i >= limit:
            raise AssertionError(f"read {i} records before the first rows came out")
        pulled.append(i)
        yield Record(f"input:{i + 1}", make(i))


@pytest.mark.parametrize("task_type", [TaskType.INSTRUCTION_FINETUNE, TaskType.CHAT_COMPLETION, TaskType.CONTINUED_PRETRAIN])
def test_the_first_rows_come_out_after_reading_a_bounded_part_of_the_input(tokenizer, monkeypatch, task_type):
    monkeypatch.setattr(pipeline, "BATCH_RECORDS", 32)
    monkeypatch.setattr(packing, "PACK_WINDOW_TOKENS", 2048)
    make = {
        TaskType.INSTRUCTION_FINETUNE: lambda i: {"prompt": f"question {i}", "response": "answer " * (i % 9 + 1)},
        TaskType.CHAT_COMPLETION: lambda i: chat(f"question {i}", "answer " * (i % 9 + 1)),
        TaskType.CONTINUED_PRETRAIN: lambda i: {"text": f"Document {i}. " + "Some text. " * (i % 9 + 1)},
    }[task_type]
    pulled: list[int] = []
    tally = Tally()
    rows = stream_rows(task_type, tokenizer, records_that_refuse_to_be_read_far_ahead(make, 5_000, pulled), 64, tally)
    first = next(rows)
    rows.close()
    assert len(first.offsets) > 1 and first.input_ids.size
    assert len(pulled) < 2_000
    assert sum(map(len, tally.lengths)) <= len(pulled)


def test_threads_keep_order_and_only_a_few_batches_in_flight():
    pulled, running, most = [], 0, 0
    lock = threading.Lock()

    def slow_square(x):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.001 * (x % 3))
        with lock:
            running -= 1
        return x * x

    def items():
        for i in range(200):
            pulled.append(i)
            yield i

    results = map_ahead(slow_square, items(), workers=2)
    assert next(results) == 0
    assert len(pulled) <= 4  # 2 * workers in flight
    assert [0, *results] == [i * i for i in range(200)]
    assert most <= 2


def test_a_bad_record_late_in_the_file_fails_the_prepare_and_caches_nothing(home):
    records = [chat(f"q{i}", f"a{i}") for i in range(2_000)] + [{"messages": "not a list"}]
    path = write_jsonl(home / "chat.jsonl", records)
    config = build_run_config(model="tessera/tiny-chat", train_data_path=str(path), register_to="main.t", context_length=64)
    with pytest.raises(DataValidationError) as info:
        prepare(config)
    assert info.value.errors == [f"{path}:2001: field 'messages': expected a list of messages, got str"]
    assert list((home / "prepared").iterdir()) == []

    write_jsonl(path, records[:-1])
    assert prepare(config).stats.examples == 2_000


def test_long_preparations_say_how_far_they_have_got(tokenizer, caplog, monkeypatch):
    caplog.set_level("INFO", logger="tessera")
    monkeypatch.setattr(packing, "PACK_WINDOW_TOKENS", 4096)
    records = (Record(f"input:{i + 1}", {"prompt": f"question {i}", "response": "answer " * 5}) for i in range(3_000))
    rows = list(with_progress(stream_rows(TaskType.INSTRUCTION_FINETUNE, tokenizer, records, 64, Tally()), "in-process", every=0))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preparing (in-process)")]
    assert len(lines) == len(rows) > 1
    assert lines[-1].startswith(f"preparing (in-process): {sum(len(r.offsets) - 1 for r in rows)} rows, {sum(len(r.input_ids) for r in rows)} tokens so far")
