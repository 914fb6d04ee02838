"""Stage: format + tokenize + pack. Turns valid records into packed rows on disk, cached by content.

Loss masks come from the tokenizer's own chat template (never a hand-written copy), so training and
serving see the same text, and a template whose masks come out empty is refused instead of training
on nothing. Each assistant turn is trained through the token that ends it (the EOS token, or the
template's own end-of-turn token when that is another one), so the model learns to stop where serving
stops it (tessera.core.generation.stop_token_ids).

The input streams through in bounded pieces, so memory does not grow with its size:

    records --batches--> tokenize (threads) --> fit to the context --> pack a window --> append rows to Arrow

The Rust tokenizer releases the GIL, so a few threads tokenize batches in parallel while the main
thread reads and validates the next ones; this needs no process pool and does not depend on
TOKENIZERS_PARALLELISM (which our entry points turn off, for safe forking).

The prepared data is `<TESSERA_HOME>/prepared/<key>/`, the key a hash of everything the rows depend on:
    rows/           a `datasets` Arrow dataset (datasets.load_from_disk), one packed row per record with
                    columns input_ids, labels, position_ids (int32 lists, at most context_length long).
                    Examples sit side by side in a row, position_ids restart at 0 for each, and the label
                    at each example's first position is IGNORE_INDEX, so no loss crosses a boundary.
                    Continued pretraining rows are context-length blocks of the text (positions 0..n-1).
    manifest.json   the inputs hashed into the key (source, data fingerprint, tokenizer hash, task type,
                    context length), the engine that prepared it, and PrepStats (counts, fill, per-example
                    lengths, a text folder's skipped files) under "stats".
Row order carries no meaning: the trainer draws its own seeded permutation and each rank takes its slice.
With a cluster, Spark executors run this same pipeline on their partitions (tasks/prepare/spark.py).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain, islice, repeat
from pathlib import Path

import numpy as np
from jinja2 import TemplateError
from prefect import task
from pydantic import BaseModel, computed_field

from tasks import stage_logger
from tessera.core import runs
from tessera.core.catalog import resolve_model
from tessera.core.config import RunConfig, TaskType
from tessera.core.errors import TesseraError
from tessera.core.generation import end_of_turn
from tessera.core.paths import home_lock, tessera_home
from tessera.core.records import supports_system_role, valid_records
from tessera.core.sources import Record, resolve_source
from tessera.core.training import IGNORE_INDEX  # defined there for every stage; still importable from here

PREP_FORMAT = 3  # bump when the prepared layout or the tokenization rules change: old caches are then unused
BATCH_RECORDS = 512  # records per tokenizer call: enough for Rust to amortize the call, small enough to stream
PACK_WINDOW_TOKENS = 1 << 22  # examples packed together; ~2k rows of 2048 leave < 0.5% of row space empty
COLUMNS = ("input_ids", "labels", "position_ids")
CONTEXT_STEP = 256  # a data-fitted default context length is a multiple of this


class PrepStats(BaseModel):
    """What the data report shows. Lengths are per example (a chat, a prompt + response, a document) before truncation."""

    examples: int
    truncated: int
    dropped_without_trainable_tokens: int
    tokens: int  # real tokens in the rows
    trainable_tokens: int  # tokens the trainer computes loss on
    rows: int
    context_length: int
    length_min: int
    length_mean: float
    length_p50: int
    length_p95: int
    length_max: int
    length_histogram: list[tuple[int, int, int]]  # (first length, end length exclusive, examples), ~20 equal bins
    skipped_files: dict[str, int] = {}  # a text folder's files that are not documents, by reason (hidden file, ...)

    @computed_field
    @property
    def fill(self) -> float:
        """Packing efficiency: real tokens / row capacity."""
        return self.tokens / max(1, self.rows * self.context_length)


class PreparedData(BaseModel):
    path: str
    cache_key: str
    reused: bool
    stats: PrepStats
    lineage: dict[str, str]


# --- tokenizing, in batches ---------------------------------------------------------------------------


@dataclass
class Examples:
    """Tokenized examples laid end to end: example i is [starts[i], starts[i] + lengths[i]) of ids and labels."""

    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: list[list[int]] | None = None) -> Examples:
        """From one list of token ids per example; labels default to a copy of the ids (train on every token)."""
        lengths = np.array([len(x) for x in ids], np.int32)
        flat_ids = np.fromiter(chain.from_iterable(ids), np.int32, count=int(lengths.sum()))
        if labels is None:
            return cls(flat_ids, flat_ids.copy(), lengths)
        return cls(flat_ids, np.fromiter(chain.from_iterable(labels), np.int32, count=len(flat_ids)), lengths)

    @classmethod
    def concat(cls, parts: list[Examples]) -> Examples:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "labels", "lengths")))

    def fit(self, context_length: int) -> tuple[Examples, int, int]:
        """Cut each example to the context, never train its first token (that would be predicting it from the
        previous example in the row), and drop examples left with nothing to train.
        Returns (fitted, number truncated, number dropped)."""
        lengths = np.minimum(self.lengths, context_length)
        keep = positions(self.lengths) < context_length
        ids, labels = self.ids[keep], self.labels[keep]
        labels[np.cumsum(lengths) - lengths] = IGNORE_INDEX
        owner = np.repeat(np.arange(len(lengths)), lengths)
        trainable = np.bincount(owner[labels != IGNORE_INDEX], minlength=len(lengths)) > 0
        keep = trainable[owner]
        fitted = Examples(ids[keep], labels[keep], lengths[trainable])
        return fitted, int((self.lengths > context_length).sum()), int((~trainable).sum())


def positions(lengths: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at each segment: the position of every token inside its example (or row)."""
    return np.arange(int(lengths.sum()), dtype=np.int32) - np.repeat(np.cumsum(lengths) - lengths, lengths).astype(np.int32)


def rust_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers tokenizer, which batch-encodes in Rust without the GIL.

    Calling it directly (not tokenizer(...), which reconfigures it on every call) is what makes it safe
    to share between threads. Truncation or padding its files may set is switched off (lengths are
    counted and cut here); tokenizer(...) sets its own again on each call, so this changes nothing there.
    """
    rust = getattr(tokenizer, "backend_tokenizer", None)
    if rust is None:
        raise TesseraError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; data prep needs one")
    if rust.truncation or rust.padding:
        rust.no_truncation()
        rust.no_padding()
    return rust


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise TesseraError("the model's tokenizer has no EOS token; it cannot learn where a response ends")
    return tokenizer.eos_token_id


def _render(tokenizer, messages, where: str, add_generation_prompt=False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:  # the template's own raise_exception(), or a failure on what this record holds
        raise TesseraError(
            f"{where}: the chat template of model {tokenizer.name_or_path} cannot render this conversation: {exc}"
        ) from None


def assistant_spans(tokenizer, messages: list[dict], where: str, added_tokens: Iterable[str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans to train on: each assistant reply and the token that
    ends its turn, the first special or added token after the reply (the EOS token, or an end-of-turn token
    such as `<|eot_id|>` that is not EOS: the one the model stops at, tessera.core.generation.stop_token_ids).

    Each span is found by rendering the conversation up to that reply with and without the reply, so
    it comes from the template itself; a template that renders prefixes inconsistently is refused.
    `where` names the record in errors; `added_tokens` are the tokenizer's (looked up once per batch).
    """
    text = _render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], where, add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], where) if i + 1 < len(messages) else text
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise TesseraError(
                f"{where}: the chat template of model {tokenizer.name_or_path} renders a conversation differently "
                "from its prefixes, so assistant tokens cannot be located for the loss mask"
            )
        turn = upto[len(prompt):]
        content = message["content"].strip()  # templates may trim it
        content_end = turn.find(content) + len(content) if content in turn else 0
        ends = end_of_turn(turn, content_end, added_tokens)
        end = ends[0] + len(ends[1]) if ends else len(turn)  # a template without end tokens: the whole turn
        spans.append((len(prompt), len(prompt) + end))
    return text, spans


def tokenize_chats(tokenizer, conversations: list[list[dict]], names: Iterable[str] | None = None) -> Examples:
    """Labels are the token itself inside assistant replies and their end tokens, IGNORE_INDEX elsewhere.
    `names` (each record's `where`) name the conversations in errors.

    A token is trained when its first character lies in a span; all spans of the batch are put on one
    character axis so a single searchsorted classifies every token.
    """
    added = tokenizer.get_added_vocab()
    rendered = [
        assistant_spans(tokenizer, messages, where, added)
        for messages, where in zip(conversations, names or repeat("a conversation"))
    ]
    texts = [text for text, _ in rendered]
    encodings = rust_tokenizer(tokenizer).encode_batch(texts, add_special_tokens=False)
    ex = Examples.from_lists([e.ids for e in encodings])
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)), np.int64)
    first, last = offsets[0::2], offsets[1::2]
    text_at = np.cumsum([len(t) for t in texts]) - [len(t) for t in texts]  # each text's place on the batch axis
    first_on_axis = first + np.repeat(text_at, ex.lengths)
    spans = np.array([(at + a, at + b) for at, (_, sp) in zip(text_at, rendered) for a, b in sp], np.int64).reshape(-1, 2)
    span = np.searchsorted(spans[:, 0], first_on_axis, side="right") - 1
    inside = (span >= 0) & (first_on_axis < spans[np.maximum(span, 0), 1]) & (last > first)
    ex.labels[~inside] = IGNORE_INDEX
    return ex


def tokenize_instructions(tokenizer, prompts: list[str], responses: list[str]) -> Examples:
    """No template (formatting is the user's pre-processing); loss on the response and the EOS token.

    The prompt is encoded as the tokenizer encodes any text (with BOS, if the model has one), the
    response after it without special tokens.
    """
    rust, eos = rust_tokenizer(tokenizer), eos_id(tokenizer)
    ids, labels = [], []
    for p, r in zip(rust.encode_batch_fast(prompts), rust.encode_batch_fast(responses, add_special_tokens=False)):
        p, r = p.ids, r.ids
        r.append(eos)
        ids.append(p + r)
        labels.append([IGNORE_INDEX] * len(p) + r)
    return Examples.from_lists(ids, labels)


def tokenize_documents(tokenizer, texts: list[str]) -> Examples:
    """Continued pretraining: each document as the tokenizer encodes text (BOS if any), then EOS; loss everywhere."""
    rust, eos = rust_tokenizer(tokenizer), eos_id(tokenizer)
    return Examples.from_lists([e.ids + [eos] for e in rust.encode_batch_fast(texts)])


def tokenize_records(task_type: TaskType, tokenizer, records: list[Record]) -> Examples:
    if task_type is TaskType.CHAT_COMPLETION:
        return tokenize_chats(tokenizer, [r.data["messages"] for r in records], [r.where for r in records])
    if task_type is TaskType.INSTRUCTION_FINETUNE:
        answers = [r.data["response"] if "response" in r.data else r.data["completion"] for r in records]
        return tokenize_instructions(tokenizer, [r.data["prompt"] for r in records], answers)
    return tokenize_documents(tokenizer, [r.data["text"] for r in records])


def batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def map_ahead(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items on `workers` threads, results in input order, at most 2 * workers in flight (bounded memory)."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --- packing into rows --------------------------------------------------------------------------------


@dataclass
class Rows:
    """Rows laid end to end: row k is [offsets[k], offsets[k + 1]) of each column."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    offsets: np.ndarray

    @property
    def trainable(self) -> int:
        """Tokens the trainer learns from: it predicts token k from token k - 1 of the same row, never a row's first."""
        return int((self.labels != IGNORE_INDEX).sum() - (self.labels[self.offsets[:-1]] != IGNORE_INDEX).sum())

    def to_arrow(self):
        import pyarrow as pa

        offsets = pa.array(self.offsets, pa.int32())
        return pa.table({c: pa.ListArray.from_arrays(offsets, pa.array(getattr(self, c))) for c in COLUMNS})


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


def pack_window(ex: Examples, capacity: int) -> Rows:
    """Best-fit-decreasing rows of whole examples, position_ids restarting at 0 for each example."""
    rows = pack_best_fit(ex.lengths.tolist(), capacity)
    order = np.fromiter(chain.from_iterable(rows), np.int64, count=len(ex.lengths))
    lengths = ex.lengths[order]
    gather = np.repeat(ex.starts[order], lengths) + positions(lengths)
    last_of_row = np.cumsum(np.array([len(r) for r in rows], np.int64)) - 1
    offsets = np.concatenate([[0], np.cumsum(lengths)[last_of_row]])
    return Rows(ex.ids[gather], ex.labels[gather], positions(lengths), offsets)


def pack_rows(batches: Iterable[Examples], capacity: int) -> Iterator[Rows]:
    """Pack windows of about PACK_WINDOW_TOKENS: memory stays bounded, and a window of a few thousand rows
    packs nearly as tightly as the whole dataset would."""
    window_tokens = max(PACK_WINDOW_TOKENS, 16 * capacity)
    window: list[Examples] = []
    size = 0
    for ex in batches:
        window.append(ex)
        size += len(ex.ids)
        if size >= window_tokens:
            yield pack_window(Examples.concat(window), capacity)
            window, size = [], 0
    if window:
        yield pack_window(Examples.concat(window), capacity)


def cut_blocks(batches: Iterable[Examples], block: int) -> Iterator[Rows]:
    """Continued pretraining: documents end to end (each ends in EOS), cut every `block` tokens; the last block
    may be shorter, and then comes alone, last. A block is continuous text, so its positions run 0..n-1 and
    every label is the token."""
    rest = np.empty(0, np.int32)
    for ex in batches:
        stream = np.concatenate([rest, ex.ids])
        full = len(stream) // block * block
        if full:
            yield _blocks(stream[:full], block)
        rest = stream[full:]
    if len(rest):
        yield _blocks(rest, block)


def _blocks(ids: np.ndarray, block: int) -> Rows:
    offsets = np.append(np.arange(0, len(ids), block), len(ids))
    return Rows(ids, ids, positions(np.diff(offsets)), offsets)


def write_rows(rows: Iterable[Rows], out: Path, fingerprint: str) -> tuple[int, int, int]:
    """Append rows to one Arrow file as they come, in the layout Dataset.save_to_disk writes (so
    datasets.load_from_disk reads it; `fingerprint` names its content for datasets' own caches).
    Returns (rows, tokens, trainable tokens)."""
    from datasets import DatasetInfo, Features, List, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({c: List(Value("int32")) for c in COLUMNS})
    shard = "data-00000-of-00001.arrow"
    out.mkdir(parents=True)
    n_rows = n_tokens = n_trainable = 0
    writer = ArrowWriter(features=features, path=str(out / shard))
    try:
        for r in rows:
            writer.write_table(r.to_arrow())
            n_rows, n_tokens, n_trainable = n_rows + len(r.offsets) - 1, n_tokens + len(r.input_ids), n_trainable + r.trainable
        writer.finalize()
    finally:
        writer.close()
    state = {
        "_data_files": [{"filename": shard}], "_fingerprint": fingerprint, "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None,
    }
    (out / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (out / "dataset_info.json").write_text(json.dumps(asdict(DatasetInfo(features=features)), indent=2))
    return n_rows, n_tokens, n_trainable


# --- the stage ----------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Per-example figures for the report, gathered as batches stream past (4 bytes per example)."""

    lengths: list[np.ndarray] = field(default_factory=list)  # tokens per example, before truncation
    truncated: int = 0
    dropped: int = 0

    def fitted(self, batches: Iterable[Examples], context_length: int) -> Iterator[Examples]:
        for ex in batches:
            self.lengths.append(ex.lengths)
            ex, truncated, dropped = ex.fit(context_length)
            self.truncated += truncated
            self.dropped += dropped
            yield ex

    def counted(self, batches: Iterable[Examples]) -> Iterator[Examples]:
        for ex in batches:
            self.lengths.append(ex.lengths)
            yield ex

    def length_report(self, bins: int = 20) -> dict:
        """min, mean, p50, p95, max, and a histogram of equal-width bins."""
        lengths = np.concatenate(self.lengths)
        lo, hi = int(lengths.min()), int(lengths.max())
        width = -(-(hi - lo + 1) // bins)
        counts = np.bincount((lengths - lo) // width)
        p50, p95 = np.percentile(lengths, [50, 95], method="inverted_cdf")
        return {
            "length_min": lo, "length_mean": float(lengths.mean()), "length_p50": int(p50), "length_p95": int(p95),
            "length_max": hi, "length_histogram": [(lo + k * width, lo + (k + 1) * width, int(c)) for k, c in enumerate(counts)],
        }


def stream_rows(
    task_type: TaskType, tokenizer, records: Iterable[Record], context_length: int, tally: Tally, workers: int | None = None
) -> Iterator[Rows]:
    """Records to rows, a bounded piece at a time: nothing here holds more than a packing window.
    `workers` tokenizer threads (default: one per core this process may use)."""
    rust_tokenizer(tokenizer)  # settles its truncation and padding now, before threads share it
    workers = workers or len(os.sched_getaffinity(0))
    batches = map_ahead(lambda batch: tokenize_records(task_type, tokenizer, batch), batched(records, BATCH_RECORDS), workers)
    if task_type is TaskType.CONTINUED_PRETRAIN:
        return cut_blocks(tally.counted(batches), context_length)
    return pack_rows(tally.fitted(batches, context_length), context_length)


def with_progress(rows: Iterable[Rows], engine: str, every: float = 10.0) -> Iterator[Rows]:
    """Rows as they come, with a log line every `every` seconds: preparing a large input takes minutes."""
    start = last = time.monotonic()
    n_rows = n_tokens = 0
    for r in rows:
        yield r
        n_rows, n_tokens = n_rows + len(r.offsets) - 1, n_tokens + len(r.input_ids)
        if time.monotonic() - last >= every:
            last = time.monotonic()
            stage_logger().info(
                "preparing (%s): %d rows, %d tokens so far, %.0f tokens/s", engine, n_rows, n_tokens, n_tokens / (last - start)
            )


def tokenizer_hash(tokenizer) -> str:
    """Everything tokenizing depends on: the Rust tokenizer (vocab, merges, normalizer, special tokens), template, EOS."""
    h = hashlib.sha256(rust_tokenizer(tokenizer).to_str().encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.eos_token]).encode())
    return h.hexdigest()


def fitted_context_length(longest: int, cap: int) -> int:
    """The smallest multiple of CONTEXT_STEP that holds the longest example, at most `cap`."""
    return min(cap, -(-longest // CONTEXT_STEP) * CONTEXT_STEP)


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def prepare(config: RunConfig, data_path: str | None = None, context_length: int | None = None) -> PreparedData:
    """Tokenize and pack `data_path` (default: the run's training data), reusing a cached result.

    Without a context length set by the run, chat and instruction data are prepared at the model's default
    (at most 4096) and, when the longest example is shorter, repacked into rows of the fitted length:
    the rows already hold every example whole, so this needs no second tokenization. `context_length`
    overrides both (eval data is prepared at the training data's length).
    """
    from transformers import AutoTokenizer

    data_path = data_path or config.train_data_path
    cluster = config.data_prep_cluster_id
    source = resolve_source(data_path, config.task_type, cluster=cluster)
    model = resolve_model(config.model, context_length or config.context_length)
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    tokenizer.name_or_path = model.name  # messages about its template name the model as the user did
    ctx = model.context_length
    inputs = {
        "format": PREP_FORMAT,
        "data": source.fingerprint(),
        "tokenizer": tokenizer_hash(tokenizer),
        "task_type": config.task_type.value,
        "context_length": ctx,
    }
    skipped = source.skipped_files()  # not in the key (the rows do not depend on them): counted afresh each time
    with home_lock(f"prepared-{cache_key(inputs)}"):  # runs preparing the same data at once: one prepares, the others reuse
        prepared = reuse(inputs, skipped, source)
        if prepared is None:
            prepared = prepare_rows(config, data_path, source, model, tokenizer, inputs, skipped)
    fitted = fitted_context_length(prepared.stats.length_max, ctx)
    if (context_length or config.context_length) is None and config.task_type is not TaskType.CONTINUED_PRETRAIN and fitted < ctx:
        inputs = {**inputs, "context_length": fitted}
        with home_lock(f"prepared-{cache_key(inputs)}"):
            prepared = reuse(inputs, skipped, source) or repack(prepared, inputs, source)
    return prepared


def lineage(source, inputs: dict) -> dict[str, str]:
    """The source's lineage params plus its fingerprint (a file's or folder's content hash), which the
    registered version's tags carry."""
    return {**source.lineage(), "source.fingerprint": inputs["data"]}


def reuse(inputs: dict, skipped: dict, source) -> PreparedData | None:
    key = cache_key(inputs)
    out = tessera_home() / "prepared" / key
    if not (out / "manifest.json").exists():
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    stage_logger().info("reusing prepared data %s (cache key %s)", out, key)
    stats = PrepStats(**{**manifest["stats"], "skipped_files": skipped})
    return PreparedData(path=str(out), cache_key=key, reused=True, stats=stats, lineage=lineage(source, inputs))


def prepare_rows(config: RunConfig, data_path: str, source, model, tokenizer, inputs: dict, skipped: dict) -> PreparedData:
    ctx = inputs["context_length"]
    # only chats go through the template: a model without one still takes prompt/response pairs and documents
    allow_system = config.task_type is TaskType.CHAT_COMPLETION and supports_system_role(tokenizer)
    tally = Tally()
    if config.data_prep_cluster_id is not None and source.kind != "hf_dataset":  # Spark has no reader for dataset splits
        from tasks.prepare.spark import spark_rows

        engine = f"Spark at {config.data_prep_cluster_id}"
        rows_out = spark_rows(source, config.data_prep_cluster_id, config.task_type, tokenizer, ctx, allow_system, tally)
    else:
        engine = "in-process"
        rows_out = stream_rows(config.task_type, tokenizer, valid_records(source, config.task_type, allow_system), ctx, tally)

    def stats(rows: int, tokens: int, trainable: int) -> PrepStats:
        if trainable == 0:
            raise TesseraError(
                f"{data_path}: no trainable tokens in {sum(map(len, tally.lengths))} example(s) after tokenizing and "
                f"truncating to {ctx} tokens (the loss mask is empty); nothing to learn from"
            )
        return PrepStats(
            examples=sum(map(len, tally.lengths)), truncated=tally.truncated, dropped_without_trainable_tokens=tally.dropped,
            tokens=tokens, trainable_tokens=trainable, rows=rows, context_length=ctx, skipped_files=skipped,
            **tally.length_report(),
        )

    manifest = {
        "source": source.model_dump(), **inputs, "model": model.name, "engine": engine,
        "packing": "blocks" if config.task_type is TaskType.CONTINUED_PRETRAIN else "best-fit-decreasing",
    }
    return commit(with_progress(rows_out, engine), inputs, manifest, stats, source)


def repack(prepared: PreparedData, inputs: dict, source) -> PreparedData:
    """The prepared examples, cut back out of their rows where position_ids restart at 0, packed into rows of
    inputs["context_length"] (which holds the longest of them)."""
    from datasets import load_from_disk

    def examples() -> Iterator[Examples]:
        table = load_from_disk(str(Path(prepared.path) / "rows")).data.table
        for batch in table.to_batches(max_chunksize=4096):
            ids, labels, pos = (batch.column(c).flatten().to_numpy() for c in COLUMNS)
            starts = np.flatnonzero(pos == 0)
            yield Examples(ids, labels.copy(), np.diff(np.append(starts, len(pos))).astype(np.int32))

    def stats(rows: int, tokens: int, trainable: int) -> PrepStats:
        return prepared.stats.model_copy(update={"rows": rows, "tokens": tokens, "trainable_tokens": trainable,
                                                 "context_length": inputs["context_length"]})

    manifest = {**json.loads((Path(prepared.path) / "manifest.json").read_text()), **inputs, "repacked_from": prepared.cache_key}
    manifest.pop("stats", None)
    return commit(pack_rows(examples(), inputs["context_length"]), inputs, manifest, stats, source)


def commit(rows: Iterable[Rows], inputs: dict, manifest: dict, stats: Callable[[int, int, int], PrepStats], source) -> PreparedData:
    """Write rows and manifest beside the cache entry, then rename it into place: never half a cache entry."""
    key = cache_key(inputs)
    out = tessera_home() / "prepared" / key
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out.parent))
    try:
        counted = stats(*write_rows(rows, tmp / "rows", key))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "manifest.json").write_text(json.dumps({**manifest, "cache_key": key, "stats": counted.model_dump()}, indent=2))
    try:
        os.rename(tmp, out)
    except OSError:  # prepared concurrently by another run: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    s = counted
    stage_logger().info(
        "prepared %d examples into %d rows of %d tokens (%s; fill %.1f%%, %d truncated, %d trainable tokens)",
        s.examples, s.rows, s.context_length, manifest["engine"], 100 * s.fill, s.truncated, s.trainable_tokens,
    )
    return PreparedData(path=str(out), cache_key=key, reused=False, stats=counted, lineage=lineage(source, inputs))


@task(name="prepare-data")
def prepare_data(config: RunConfig, data_path: str | None = None, context_length: int | None = None) -> PreparedData:
    """The stage in a run: also tells the run's events what was prepared (or reused)."""
    prepared = prepare(config, data_path, context_length)
    s = prepared.stats
    runs.append_event(
        config.name, "prepare",
        f"{'reused' if prepared.reused else 'prepared'} {data_path or config.train_data_path}: {s.examples} examples, "
        f"{s.tokens} tokens in {s.rows} rows of {s.context_length} (fill {100 * s.fill:.1f}%, {s.truncated} truncated)",
    )
    return prepared


def row_tokens(prepared_path: str) -> np.ndarray:
    """Real tokens in each packed row, from the Arrow offsets alone (the step plan counts with them)."""
    from datasets import load_from_disk

    ids = load_from_disk(str(Path(prepared_path) / "rows")).data.table.column("input_ids").combine_chunks()
    return np.diff(ids.offsets.to_numpy())
