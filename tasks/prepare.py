"""Stage: format + tokenize + pack. Turns valid records into packed rows on disk, cached by content.

Loss masks come from the tokenizer's own chat template (never a hand-written copy), so training and
serving see the same text, and a template whose masks come out empty is refused instead of training
on nothing.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks import stage_logger
from tessera.catalog import ResolvedModel, resolve_model
from tessera.config import RunConfig, TaskType
from tessera.errors import TesseraError
from tessera.paths import tessera_home
from tessera.records import supports_system_role, valid_records
from tessera.sources import Source, resolve_source

IGNORE_INDEX = -100
PREP_FORMAT = 1  # bump when the prepared layout or the tokenization rules change: old caches are then unused


class PrepStats(BaseModel):
    examples: int
    truncated: int
    dropped_without_trainable_tokens: int
    tokens: int
    trainable_tokens: int
    rows: int
    context_length: int

    @property
    def fill(self) -> float:
        return self.tokens / max(1, self.rows * self.context_length)


class PreparedData(BaseModel):
    path: str
    cache_key: str
    reused: bool
    stats: PrepStats
    lineage: dict[str, str]


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans to train on: each assistant reply plus its end token.

    Each span is found by rendering the conversation up to that reply with and without the reply, so
    it comes from the template itself; a template that renders prefixes inconsistently is refused.
    """
    text = _render(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1]) if i + 1 < len(messages) else text
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise TesseraError(
                "the model's chat template renders a conversation differently from its prefixes, "
                "so assistant tokens cannot be located for the loss mask"
            )
        turn = upto[len(prompt):]
        content_end = turn.find(message["content"]) + len(message["content"]) if message["content"] in turn else 0
        eos_at = turn.find(eos, content_end) if eos else -1
        end = eos_at + len(eos) if eos_at >= 0 else len(turn)
        spans.append((len(prompt), len(prompt) + end))
    return text, spans


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """input_ids and labels (IGNORE_INDEX outside assistant replies and their end tokens)."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE_INDEX] * len(enc["input_ids"])
    for k, (tok_id, (start, stop)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        if stop > start and any(s <= start < e for s, e in spans):
            labels[k] = tok_id
    return enc["input_ids"], labels


def tokenize_instruction(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """No template (formatting is the user's pre-processing); loss on the response and the EOS token."""
    if tokenizer.eos_token_id is None:
        raise TesseraError("the model's tokenizer has no EOS token; it cannot learn where a response ends")
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each example (longest first) goes into the fullest row it still fits in."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, row index)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            space, row = capacity - n, len(rows) - 1
        else:
            space, row = free.pop(at)
            rows[row].append(i)
            space -= n
        if space > 0:
            bisect.insort(free, (space, row))
    return rows


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(config: RunConfig, model: ResolvedModel, source: Source) -> str:
    tokenizer_files = [p for p in Path(model.path).glob("*") if p.name.startswith(("tokenizer", "special_tokens"))]
    parts = {
        "format": PREP_FORMAT,
        "data": source.fingerprint(),
        "tokenizer": _hash_files(tokenizer_files) if tokenizer_files else model.path,
        "task_type": config.task_type.value,
        "context_length": model.context_length,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def tokenize_records(config: RunConfig, tokenizer, source: Source, context_length: int):
    """Yield (input_ids, labels, truncated) per valid record."""
    allow_system = supports_system_role(tokenizer)
    for rec in valid_records(source, config.task_type, allow_system):
        if config.task_type is TaskType.CHAT_COMPLETION:
            ids, labels = tokenize_chat(tokenizer, rec.data["messages"])
        else:
            answer = rec.data.get("response", rec.data.get("completion"))
            ids, labels = tokenize_instruction(tokenizer, rec.data["prompt"], answer)
        yield ids, labels, len(ids) > context_length


def prepare(config: RunConfig, data_path: str | None = None) -> PreparedData:
    """Tokenize and pack `data_path` (default: the run's training data), reusing a cached result."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    data_path = data_path or config.train_data_path
    source = resolve_source(data_path, config.task_type)
    model = resolve_model(config.model, config.context_length)
    key = cache_key(config, model, source)
    out = tessera_home() / "prepared" / key
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        stage_logger().info("reusing prepared data %s (cache key %s)", out, key)
        return PreparedData(path=str(out), cache_key=key, reused=True, stats=PrepStats(**manifest["stats"]), lineage=source.lineage())

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    ctx = model.context_length
    examples, truncated, dropped = [], 0, 0
    count = 0
    for ids, labels, was_truncated in tokenize_records(config, tokenizer, source, ctx):
        count += 1
        truncated += was_truncated
        ids, labels = ids[:ctx], labels[:ctx]
        labels[0] = IGNORE_INDEX  # a packed example never learns from the one before it
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append((ids, labels))
    trainable = sum(sum(1 for label in labels if label != IGNORE_INDEX) for _, labels in examples)
    if trainable == 0:
        raise TesseraError(
            f"{data_path}: no trainable tokens in {count} example(s) after tokenizing and truncating to "
            f"{ctx} tokens (the loss mask is empty); nothing to learn from"
        )
    rows = pack_best_fit([len(ids) for ids, _ in examples], ctx)
    columns = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        for name in columns:
            columns[name].append([])
        for i in row:
            ids, labels = examples[i]
            columns["input_ids"][-1].extend(ids)
            columns["labels"][-1].extend(labels)
            columns["position_ids"][-1].extend(range(len(ids)))
    stats = PrepStats(
        examples=count,
        truncated=truncated,
        dropped_without_trainable_tokens=dropped,
        tokens=sum(len(ids) for ids, _ in examples),
        trainable_tokens=trainable,
        rows=len(rows),
        context_length=ctx,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out.parent))
    Dataset.from_dict(columns).save_to_disk(str(tmp / "rows"))
    manifest = {"source": source.model_dump(), "task_type": config.task_type.value, "model": model.name, "cache_key": key, "stats": stats.model_dump()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        os.rename(tmp, out)
    except OSError:  # prepared concurrently by another run: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    stage_logger().info(
        "prepared %d examples into %d rows of %d tokens (fill %.1f%%, %d truncated, %d trainable tokens)",
        count, len(rows), ctx, 100 * stats.fill, truncated, trainable,
    )
    return PreparedData(path=str(out), cache_key=key, reused=False, stats=stats, lineage=source.lineage())


prepare_data = task(prepare, name="prepare-data")
