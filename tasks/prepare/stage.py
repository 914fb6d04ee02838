"""Stage: prepare. Turns valid records into packed rows on disk, cached by content.

The input streams through in bounded pieces, so memory does not grow with its size:

    records --batches--> tokenize (threads) --> fit to the context --> pack a window --> append rows to Arrow

Tokenizing with loss masks is tasks/prepare/tokenizing.py, packing tasks/prepare/packing.py, the rows on disk
tasks/prepare/rows.py, the streaming pipeline that joins them tasks/prepare/pipeline.py; this module is the stage
itself: the cache, the data report's figures, and the Prefect task.

The prepared data is `<TESSERA_HOME>/prepared/<key>/`, the key a hash of everything the rows depend on:
    rows/           one Arrow file of packed rows (tasks/prepare/rows.py: written in the layout datasets.load_from_disk
                    reads, read with pyarrow), columns input_ids, labels, position_ids (int32 lists, at most
                    context_length long).
                    Examples sit side by side in a row, position_ids restart at 0 for each, and the label
                    at each example's first position is IGNORE_INDEX, so no loss crosses a boundary.
                    Continued pretraining rows are context-length blocks of the text (positions 0..n-1).
    manifest.json   the inputs hashed into the key (source, data fingerprint, tokenizer hash, task type,
                    context length), the engine that prepared it, and PrepStats (counts, fill, per-example
                    lengths, a text folder's skipped files) under "stats".
A cache hit reads only the source's fingerprint, the model directory's files (weights aside) and the manifest:
the tokenizer is loaded (and transformers imported) only to prepare, or to hash a model given as a Hugging Face id.
Row order carries no meaning: the trainer draws its own seeded permutation and each rank takes its slice.
With a cluster, Spark executors run this same pipeline on their partitions (tasks/prepare/spark.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from functools import cache, partial
from pathlib import Path

import numpy as np
from prefect import task
from pydantic import BaseModel, computed_field

from tasks import stage_logger
from tasks.prepare.packing import pack_rows
from tasks.prepare.pipeline import Tally, stream_rows
from tasks.prepare.rows import Rows, read_rows, tokens_per_row, write_rows
from tasks.prepare.tokenizing import Examples, tokenizer_files_hash, tokenizer_hash
from tessera.core import runs
from tessera.core.catalog import ResolvedModel, resolve_model
from tessera.core.config import RunConfig, TaskType
from tessera.core.errors import TesseraError
from tessera.core.paths import home_lock, prepared_dir
from tessera.core.records import supports_system_role, valid_records
from tessera.core.sources import resolve_source

PREP_FORMAT = 4  # bump when the prepared layout, the tokenization rules or the key's inputs change: old caches are then unused
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
    data_path = data_path or config.train_data_path
    cluster = config.data_prep_cluster_id
    source = resolve_source(data_path, config.task_type, cluster=cluster)
    model = resolve_model(config.model, context_length or config.context_length)
    tokenizer = cache(partial(load_tokenizer, model))  # loaded once, and only when needed: a cache hit never is
    ctx = model.context_length
    inputs = {
        "format": PREP_FORMAT,
        "data": source.fingerprint(),
        "tokenizer": tokenizer_identity(model, tokenizer),
        "task_type": config.task_type.value,
        "context_length": ctx,
    }
    skipped = source.skipped_files()  # not in the key (the rows do not depend on them): counted afresh each time
    with home_lock(f"prepared-{cache_key(inputs)}"):  # runs preparing the same data at once: one prepares, the others reuse
        prepared = reuse(inputs, skipped, source)
        if prepared is None:
            prepared = prepare_rows(config, data_path, source, model, tokenizer(), inputs, skipped)
    fitted = fitted_context_length(prepared.stats.length_max, ctx)
    if (context_length or config.context_length) is None and config.task_type is not TaskType.CONTINUED_PRETRAIN and fitted < ctx:
        inputs = {**inputs, "context_length": fitted}
        with home_lock(f"prepared-{cache_key(inputs)}"):
            prepared = reuse(inputs, skipped, source) or repack(prepared, inputs, source)
    return prepared


def load_tokenizer(model: ResolvedModel):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    tokenizer.name_or_path = model.name  # messages about its template name the model as the user did
    return tokenizer


def tokenizer_identity(model: ResolvedModel, tokenizer: Callable[[], object]) -> str:
    """The cache key's tokenizer: a local model directory's files, hashed without loading them; a model given as a
    Hugging Face id (its files somewhere in the HF cache) is loaded, by `tokenizer()`, and hashed."""
    local = Path(model.path)
    return tokenizer_files_hash(local) if local.is_dir() else tokenizer_hash(tokenizer())


def lineage(source, inputs: dict) -> dict[str, str]:
    """The source's lineage params plus its fingerprint (a file's or folder's content hash), which the
    registered version's tags carry."""
    return {**source.lineage(), "source.fingerprint": inputs["data"]}


def reuse(inputs: dict, skipped: dict, source) -> PreparedData | None:
    key = cache_key(inputs)
    out = prepared_dir() / key
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

    def examples() -> Iterator[Examples]:
        for rows in read_rows(prepared.path):
            starts = np.flatnonzero(rows.position_ids == 0)
            yield Examples(rows.input_ids, rows.labels.copy(), np.diff(np.append(starts, len(rows.position_ids))).astype(np.int32))

    def stats(rows: int, tokens: int, trainable: int) -> PrepStats:
        return prepared.stats.model_copy(update={"rows": rows, "tokens": tokens, "trainable_tokens": trainable,
                                                 "context_length": inputs["context_length"]})

    manifest = {**json.loads((Path(prepared.path) / "manifest.json").read_text()), **inputs, "repacked_from": prepared.cache_key}
    manifest.pop("stats", None)
    return commit(pack_rows(examples(), inputs["context_length"]), inputs, manifest, stats, source)


def commit(rows: Iterable[Rows], inputs: dict, manifest: dict, stats: Callable[[int, int, int], PrepStats], source) -> PreparedData:
    """Write rows and manifest beside the cache entry, then rename it into place: never half a cache entry."""
    key = cache_key(inputs)
    out = prepared_dir() / key
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
    """Real tokens in each packed row (the step plan counts with them)."""
    return tokens_per_row(read_rows(prepared_path))
