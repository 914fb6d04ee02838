"""Loss masks from the model's own chat template, truncation, packing, and the prepared-data cache."""

import json
import shutil
from pathlib import Path

import pytest

from tasks.prepare.packing import pack_best_fit, pack_window
from tasks.prepare.rows import read_rows
from tasks.prepare.stage import prepare
from tasks.prepare.tokenizing import tokenize_chats, tokenize_instructions
from tessera.core.config import build_run_config
from tessera.core.errors import TesseraError
from tessera.core.training import IGNORE_INDEX

from conftest import chat, write_jsonl


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """One conversation through the batch tokenizer: input_ids and labels."""
    ex = tokenize_chats(tokenizer, [messages])
    return ex.ids.tolist(), ex.labels.tolist()


def tokenize_instruction(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """One prompt/response pair through the batch tokenizer: input_ids and labels."""
    ex = tokenize_instructions(tokenizer, [prompt], [response])
    return ex.ids.tolist(), ex.labels.tolist()


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


def rows_of(prepared) -> list[dict]:
    """The prepared rows, one dict of columns per row, read as the trainer reads them."""
    return [row for part in read_rows(prepared.path) for row in part.to_arrow().to_pylist()]


def test_prepare_writes_packed_rows_with_restarting_positions_and_reuses_the_cache(home, tokenizer):
    path = write_jsonl(home / "chat.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(20)])
    first = prepare(run_config(path))
    assert not first.reused
    assert first.stats.examples == 20 and first.stats.truncated == 0
    rows = rows_of(first)
    assert len(rows) == first.stats.rows
    starts = sum(p == 0 for row in rows for p in row["position_ids"])
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


# --- batches, rows, stats, manifest, cache, continued pretraining ---------------------------------------


def unpack(rows) -> list[tuple[tuple, tuple]]:
    """Every example in packed rows, as (input_ids, labels), split wherever position_ids restart at 0."""
    out = []
    for row in rows:
        starts = [k for k, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            out.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b])))
    return out


def expected_example(ids, labels, ctx):
    """What one example should look like in a row: cut to the context, its first token never trained."""
    ids, labels = ids[:ctx], labels[:ctx]
    return tuple(ids), (IGNORE_INDEX, *labels[1:])


def instruction_records(n, seed=0):
    import random

    rng = random.Random(seed)
    words = "the cat sat on a mat and then it ran far away from home".split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    return [{"prompt": text(rng.randint(1, 40)), "response": text(rng.randint(1, 60))} for _ in range(n)]


def test_instruction_ids_are_what_the_tokenizer_gives_for_prompt_then_response(tokenizer):
    prompt, response = "Translate: chat", " the cat"
    ids, labels = tokenize_instruction(tokenizer, prompt, response)
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == p + r and labels == [IGNORE_INDEX] * len(p) + r


def test_a_batch_tokenizes_exactly_like_one_at_a_time(tokenizer):
    conversations = [
        chat("What is 2+2?", "4.", "And 3+3?", "6.", system="You do sums."),
        chat("hi", "hello there"),
        chat("a " * 30, "b " * 5, "c", "d " * 12),
    ]
    batch = tokenize_chats(tokenizer, [c["messages"] for c in conversations])
    one_by_one = [tokenize_chat(tokenizer, c["messages"]) for c in conversations]
    assert batch.lengths.tolist() == [len(ids) for ids, _ in one_by_one]
    assert batch.ids.tolist() == [t for ids, _ in one_by_one for t in ids]
    assert batch.labels.tolist() == [t for _, labels in one_by_one for t in labels]

    records = instruction_records(5)
    batch = tokenize_instructions(tokenizer, [r["prompt"] for r in records], [r["response"] for r in records])
    one_by_one = [tokenize_instruction(tokenizer, r["prompt"], r["response"]) for r in records]
    assert batch.labels.tolist() == [t for _, labels in one_by_one for t in labels]


def test_rows_hold_every_example_once_and_no_loss_crosses_a_boundary(home, tokenizer, monkeypatch):
    """Several packing windows (a small window here), truncation, and the exact tokens of each example."""
    import tasks.prepare.packing as packing
    import tasks.prepare.pipeline as pipeline

    monkeypatch.setattr(packing, "PACK_WINDOW_TOKENS", 1500)
    monkeypatch.setattr(pipeline, "BATCH_RECORDS", 16)
    windows = []
    monkeypatch.setattr(packing, "pack_window", lambda ex, capacity: windows.append(ex) or pack_window(ex, capacity))
    records = instruction_records(300) + [{"prompt": "a long story", "response": "story " * 300}]
    path = write_jsonl(home / "pairs.jsonl", records)
    ctx = 256
    prepared = prepare(run_config(path, task_type="INSTRUCTION_FINETUNE", context_length=ctx))
    rows = rows_of(prepared)
    assert all(set(r) == {"input_ids", "labels", "position_ids"} for r in rows)
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= ctx for r in rows)
    expected = [expected_example(*tokenize_instruction(tokenizer, r["prompt"], r["response"]), ctx) for r in records]
    assert sorted(unpack(rows)) == sorted(expected)
    assert prepared.stats.truncated == 1 and prepared.stats.rows == len(rows)
    assert len(windows) > 3
    assert prepared.stats.fill > 0.9


def test_stats_describe_the_rows_and_the_examples(home, tokenizer):
    import numpy as np

    records = instruction_records(200, seed=1)
    path = write_jsonl(home / "pairs.jsonl", records)
    prepared = prepare(run_config(path, task_type="INSTRUCTION_FINETUNE", context_length=128))
    s, rows = prepared.stats, rows_of(prepared)
    assert s.tokens == sum(len(r["input_ids"]) for r in rows)
    assert s.trainable_tokens == sum(1 for r in rows for label in r["labels"][1:] if label != IGNORE_INDEX)
    assert s.fill == pytest.approx(s.tokens / (s.rows * 128))
    lengths = np.array([len(tokenize_instruction(tokenizer, r["prompt"], r["response"])[0]) for r in records])
    assert (s.length_min, s.length_max, s.length_p50) == (lengths.min(), lengths.max(), int(np.sort(lengths)[99]))
    assert s.length_mean == pytest.approx(lengths.mean())
    assert s.length_p95 == int(np.sort(lengths)[189])
    bins = s.length_histogram
    assert len(bins) <= 20 and bins[0][0] == s.length_min and bins[-1][0] <= s.length_max < bins[-1][1]
    assert all(a[1] == b[0] for a, b in zip(bins, bins[1:]))  # contiguous
    assert [c for *_, c in bins] == [int(((lengths >= lo) & (lengths < hi)).sum()) for lo, hi, _ in bins]
    assert sum(c for *_, c in bins) == s.examples == 200


def test_manifest_names_everything_the_rows_depend_on(home):
    from tessera.core.sources import resolve_source
    from tessera.core.config import TaskType

    path = write_jsonl(home / "chat.jsonl", [chat("q", "a"), chat("q2", "a2")])
    prepared = prepare(run_config(path, context_length=64))
    manifest = json.loads((Path(prepared.path) / "manifest.json").read_text())
    source = resolve_source(str(path), TaskType.CHAT_COMPLETION)
    assert manifest["source"] == json.loads(source.model_dump_json())
    assert manifest["data"] == source.fingerprint()
    assert len(manifest["tokenizer"]) == 64
    assert (manifest["task_type"], manifest["context_length"], manifest["cache_key"]) == ("CHAT_COMPLETION", 64, prepared.cache_key)
    assert manifest["stats"] == prepared.stats.model_dump(mode="json")


def test_a_cache_hit_loads_no_tokenizer_and_any_input_change_misses_it(home, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    path = write_jsonl(home / "chat.jsonl", [chat(f"q{i}", f"a{i}") for i in range(10)])
    first = prepare(run_config(path, context_length=64))

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached prepare loaded the tokenizer")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_loading)
    again = prepare(run_config(path, context_length=64))
    assert again.reused and again.path == first.path and again.stats == first.stats
    copy = home / "models" / "copy"  # the same files elsewhere: the same tokenizer, so the same rows
    shutil.copytree(tiny_model_dir, copy)
    copy_config = build_run_config(model=str(copy), train_data_path=str(path), register_to="main.t", context_length=64)
    assert prepare(copy_config).path == first.path
    monkeypatch.undo()

    keys = {first.cache_key, prepare(run_config(path, context_length=32)).cache_key}
    (copy / "chat_template.jinja").write_text("{# edited #}" + (tiny_model_dir / "chat_template.jinja").read_text())
    keys.add(prepare(copy_config).cache_key)
    tokenizer_config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "add_bos_token": True}))
    keys.add(prepare(copy_config).cache_key)
    assert len(keys) == 4


def test_a_model_given_as_a_hugging_face_id_is_prepared_from_the_hf_cache(home, tiny_model_dir, tmp_path, monkeypatch):
    """No local directory to hash: the tokenizer is loaded from the HF cache (offline) to key the cache, and reused."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny-chat"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    path = write_jsonl(home / "chat.jsonl", [chat(f"q{i}", f"a{i}") for i in range(10)])
    config = build_run_config(model="someone/tiny-chat", train_data_path=str(path), register_to="main.t", context_length=64)
    first = prepare(config)
    assert not first.reused and first.stats.examples == 10
    assert prepare(config).path == first.path


def test_preparing_is_deterministic(home, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(f"question {i}", "answer " * (i % 13)) for i in range(100)])
    first = rows_of(prepare(run_config(path, context_length=80)))
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere" / "models").mkdir(parents=True)
    (tmp_path / "elsewhere" / "models" / "tiny-chat").symlink_to(home / "models" / "tiny-chat")
    second = rows_of(prepare(run_config(path, context_length=80)))
    assert first == second


def test_documents_are_joined_with_eos_and_cut_into_context_blocks(tokenizer):
    from tasks.prepare.packing import cut_blocks
    from tasks.prepare.tokenizing import tokenize_documents

    texts = ["The cat sat on the mat. " * (1 + i % 5) for i in range(12)]
    stream = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    halves = [tokenize_documents(tokenizer, texts[:5]), tokenize_documents(tokenizer, texts[5:])]
    blocks = list(cut_blocks(halves, 32))
    ids = [t for b in blocks for t in b.input_ids.tolist()]
    assert ids == stream  # every token, in order, across batch boundaries
    lengths = [int(n) for b in blocks for n in b.offsets[1:] - b.offsets[:-1]]
    assert lengths[:-1] == [32] * (len(lengths) - 1) and 0 < lengths[-1] <= 32
    for b in blocks:
        assert b.labels.tolist() == b.input_ids.tolist()
        assert b.position_ids.tolist() == [p for n in b.offsets[1:] - b.offsets[:-1] for p in range(n)]


def test_continued_pretraining_through_prepare(home, tokenizer):
    docs = home / "docs"
    texts = [f"Document {i}. Delta tables are read in-process. " * (3 + 7 * i) for i in range(6)]
    for i, text in enumerate(texts):
        (docs / f"d{i}").mkdir(parents=True)
        (docs / f"d{i}" / "doc.txt").write_text(text)
    prepared = prepare(run_config(docs, task_type="CONTINUED_PRETRAIN", context_length=64))
    rows = rows_of(prepared)
    s = prepared.stats
    stream = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    assert [t for r in rows for t in r["input_ids"]] == stream
    assert s.examples == 6 and s.truncated == 0 and s.tokens == len(stream) and s.rows == len(rows) == -(-len(stream) // 64)
    assert all(len(r["input_ids"]) == 64 for r in rows[:-1])
    assert all(r["labels"] == r["input_ids"] and r["position_ids"] == list(range(len(r["input_ids"]))) for r in rows)
    assert s.trainable_tokens == s.tokens - s.rows  # a row's first token is never predicted


def test_lengths_are_counted_and_cut_here_whatever_truncation_the_tokenizer_files_set(tokenizer):
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)
    ids, labels = tokenize_instruction(tokenizer, "a prompt of several words", "and a response of several words")
    assert len(ids) > 8 and ids[-1] == tokenizer.eos_token_id


def test_default_context_length_fits_the_longest_example_without_losing_any(home, tokenizer):
    """No context length set: rows of the smallest multiple of 256 that holds the longest example, repacked from the
    rows prepared at the default cap, so every token and label is the one the cap's preparation made."""
    records = [chat(f"question {i} " + "why " * (i % 5), "answer " * (1 + i % 40)) for i in range(60)]
    path = write_jsonl(home / "chat.jsonl", records)
    fitted = prepare(run_config(path))
    capped = prepare(run_config(path, context_length=512))  # tiny-chat's maximum, the cap it was first prepared at
    assert fitted.stats.length_max <= 256 < capped.stats.length_max * 2
    assert fitted.stats.context_length == 256 and capped.stats.context_length == 512
    assert (fitted.stats.examples, fitted.stats.tokens, fitted.stats.trainable_tokens) == (
        capped.stats.examples, capped.stats.tokens, capped.stats.trainable_tokens)
    assert fitted.stats.rows > capped.stats.rows

    def examples(prepared):
        out = []
        for row in rows_of(prepared):
            starts = [k for k, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
            out += [(tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b])) for a, b in zip(starts, starts[1:])]
        return sorted(out)

    assert examples(fitted) == examples(capped)
    assert max(len(r["input_ids"]) for r in rows_of(fitted)) <= 256
    assert prepare(run_config(path)).reused  # both steps are cached
