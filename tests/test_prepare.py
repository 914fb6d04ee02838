"""Loss masks from the model's own chat template, truncation, packing, and the prepared-data cache."""

import json

import pytest

from tasks.prepare import IGNORE_INDEX, pack_best_fit, prepare, tokenize_chat, tokenize_instruction
from tessera.config import build_run_config
from tessera.errors import TesseraError

from conftest import chat, write_jsonl


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_chat_mask_is_exactly_the_assistant_replies_and_their_end_tokens(tokenizer):
    record = chat("What is 2+2?", "It is 4.", "And 3+3?", "It is 6.", system="You do sums.")
    ids, labels = tokenize_chat(tokenizer, record["messages"])
    assert len(ids) == len(labels)
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, ids, labels) == f"It is 4.{eos}It is 6.{eos}"
    # every masked-in token is the token at that position (labels are not shifted or altered)
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels))
    # the end-of-turn token of each reply is trained: the model learns to stop
    assert sum(1 for t, label in zip(ids, labels) if label == tokenizer.eos_token_id) == 2


def test_chat_mask_follows_the_template_not_a_copy_of_it(tokenizer):
    """A different template (Llama-3-like headers) moves the spans; the mask still fits exactly."""
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' says:\n\n' + m['content'] | trim + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant says:\n\n' }}{% endif %}"
    )
    ids, labels = tokenize_chat(tokenizer, chat("hello there", " general kenobi ")["messages"])
    assert trained_text(tokenizer, ids, labels) == f"general kenobi{tokenizer.eos_token}"


def test_a_template_that_is_not_prefix_consistent_is_refused(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TesseraError, match="loss mask"):
        tokenize_chat(tokenizer, chat("q", "a")["messages"])


def test_instruction_mask_is_the_response_and_eos(tokenizer):
    ids, labels = tokenize_instruction(tokenizer, "Translate: chat", "cat")
    assert trained_text(tokenizer, ids, labels) == f"cat{tokenizer.eos_token}"
    assert tokenizer.decode(ids) == f"Translate: chatcat{tokenizer.eos_token}"


def test_best_fit_decreasing_packs_tightly_and_keeps_every_example():
    lengths = [7, 5, 4, 3, 3, 2, 1, 1]
    rows = pack_best_fit(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 26 tokens need at least 3 rows of 10


def test_packing_a_single_tiny_example():
    assert pack_best_fit([3], capacity=512) == [[0]]


def run_config(path, **kw):
    return build_run_config(model="tessera/tiny-chat", train_data_path=str(path), register_to="main.t", **kw)


def test_prepare_writes_packed_rows_with_restarting_positions_and_reuses_the_cache(home, tokenizer):
    path = write_jsonl(home / "chat.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(20)])
    first = prepare(run_config(path))
    assert not first.reused
    assert first.stats.examples == 20 and first.stats.truncated == 0
    from datasets import load_from_disk

    rows = load_from_disk(f"{first.path}/rows")
    assert len(rows) == first.stats.rows
    starts = sum(p == 0 for row in rows["position_ids"] for p in row)
    assert starts == 20  # one position-0 per packed example
    for row in rows:
        for k, p in enumerate(row["position_ids"]):
            if p == 0:  # never learn an example's first token from the previous example
                assert row["labels"][k] == IGNORE_INDEX

    again = prepare(run_config(path))
    assert again.reused and again.cache_key == first.cache_key

    path.write_text(path.read_text() + json.dumps(chat("one", "more")) + "\n")
    changed = prepare(run_config(path))
    assert not changed.reused and changed.cache_key != first.cache_key


def test_truncation_is_counted(home):
    long_answer = " ".join(["word"] * 400)
    path = write_jsonl(home / "chat.jsonl", [chat("q", long_answer), chat("q", "short")])
    prepared = prepare(run_config(path, context_length=64))
    assert prepared.stats.truncated == 1
    assert prepared.stats.examples == 2


def test_zero_trainable_tokens_is_refused(home):
    """A system prompt and question that fill the context leave no assistant token to train."""
    path = write_jsonl(home / "chat.jsonl", [chat("q " * 200, "a", system="s")])
    with pytest.raises(TesseraError, match="no trainable tokens"):
        prepare(run_config(path, context_length=32))
