"""The prepare stage on Spark: executors check, tokenize and pack their own partitions (mapInArrow); the packed
rows stream back to the driver, which writes them in the same prepared format as in-process prep.

    spark_input(source) --mapInArrow(prepare_partition)--> packed rows..., one summary per partition --> write_rows

A partition runs the in-process pipeline (tasks/prepare/pipeline.py) on its own records (spark_partition_records ->
RecordCheck -> stream_rows), so examples pack within a partition: the tokens are exactly those of in-process prep, and rows
are as full once a partition holds a few thousand examples. A packed row comes back as raw int32 bytes (at
most context_length * 4 per column), so the driver does no per-token work. Partitions come in no fixed
order, interleaved (Sail streams them as they run, and numbers them differently from run to run): row order
does not matter (the trainer draws its own), and the summary that ends each partition carries only what
adds up regardless of order: counts, example lengths, the number of bad records, and, for continued
pretraining, the partition's short last block (the driver joins those and cuts them as in-process prep
would). When any record is bad the driver names every error with an in-process pass that stops at the last
one (tessera.core.records.named_errors), so messages are exactly those of in-process prep, and nothing is written.

Executors need Tessera installed, like any library a UDF uses; local masters and Sail run this interpreter.
The stage calls spark_rows; this module imports only the modules below the stage (tokenizing, packing, rows, pipeline).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from tasks.prepare.packing import cut_blocks
from tasks.prepare.pipeline import Tally, stream_rows
from tasks.prepare.rows import COLUMNS, Rows
from tasks.prepare.tokenizing import Examples, tokenizer_hash
from tessera.core.config import TaskType
from tessera.core.errors import TesseraError
from tessera.core.records import RecordCheck, named_errors
from tessera.core.sources import Source, spark_input, spark_partition_records

OUTPUT = pa.schema(
    [(c, pa.binary()) for c in COLUMNS]  # a packed row
    + [  # or a partition's summary
        ("records", pa.int64()), ("errors", pa.int64()), ("lengths", pa.binary()),
        ("truncated", pa.int64()), ("dropped", pa.int64()), ("rest", pa.binary()),
    ]
)
OUTPUT_DDL = (
    "input_ids binary, labels binary, position_ids binary, "
    "records bigint, errors bigint, lengths binary, truncated bigint, dropped bigint, rest binary"
)
ROWS_PER_CHUNK = 1024  # packed rows the driver hands to the writer at a time


class PartitionJob(BaseModel):
    """What every executor needs, shipped with the function: the tokenizer travels as its files."""

    source: Source
    task_type: TaskType
    context_length: int
    allow_system: bool
    tokenizer_key: str
    tokenizer_files: dict[str, bytes]


def spark_rows(
    source: Source, cluster: str, task_type: TaskType, tokenizer, context_length: int, allow_system: bool, tally: Tally
) -> Iterator[Rows]:
    """Packed rows from Spark's executors, in bounded chunks; after the last, raise if any record was bad."""
    job = PartitionJob(
        source=source, task_type=task_type, context_length=context_length, allow_system=allow_system,
        tokenizer_key=tokenizer_hash(tokenizer), tokenizer_files=tokenizer_files(tokenizer),
    )
    summaries, chunk = [], []
    with spark_input(source, cluster) as frame:
        for row in frame.mapInArrow(partial(prepare_partition, job=job), OUTPUT_DDL).toLocalIterator():
            if row.records is not None:
                summaries.append(row)
                continue
            chunk.append(row)
            if len(chunk) == ROWS_PER_CHUNK:
                yield rows_of(chunk)
                chunk = []
    if chunk:
        yield rows_of(chunk)
    check = RecordCheck(task_type, allow_system)
    check.count = sum(s.records for s in summaries)
    bad = sum(s.errors for s in summaries)
    if bad:
        check.errors = named_errors(source, task_type, allow_system, bad)
        if not check.errors:  # the engines disagree about the data: refuse it rather than train on part of it
            raise TesseraError(f"{source.display}: Spark at {cluster} found {bad} bad record(s) that reading it here does not")
    check.raise_if_invalid(source.display)
    for s in summaries:
        tally.lengths.append(np.frombuffer(s.lengths, np.int32))
        tally.truncated += s.truncated
        tally.dropped += s.dropped
    if task_type is TaskType.CONTINUED_PRETRAIN:  # the partitions' short last blocks, cut as one stream
        stream = np.concatenate([np.frombuffer(s.rest, np.int32) for s in summaries])
        yield from cut_blocks([Examples(stream, stream, np.array([len(stream)]))], context_length)


def rows_of(chunk: list) -> Rows:
    lengths = np.array([len(r.input_ids) // 4 for r in chunk], np.int64)
    columns = {c: np.frombuffer(b"".join(getattr(r, c) for r in chunk), np.int32) for c in COLUMNS}
    return Rows(**columns, offsets=np.concatenate([[0], np.cumsum(lengths)]))


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


# --- on the executors ---------------------------------------------------------------------------------

_tokenizers: dict[str, object] = {}  # per executor process: loaded once, whatever the number of partitions


def executor_tokenizer(job: PartitionJob):
    if job.tokenizer_key not in _tokenizers:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as folder:
            for name, content in job.tokenizer_files.items():
                (Path(folder) / name).write_bytes(content)
            _tokenizers[job.tokenizer_key] = AutoTokenizer.from_pretrained(folder)
    return _tokenizers[job.tokenizer_key]


def prepare_partition(batches: Iterator[pa.RecordBatch], job: PartitionJob) -> Iterator[pa.RecordBatch]:
    """One partition: its packed rows, then its summary. Spark gives each task one core: one tokenizer thread."""
    check, tally = RecordCheck(job.task_type, job.allow_system), Tally()
    records = check.valid(spark_partition_records(job.source, batches))
    rest = np.empty(0, np.int32)
    for rows in stream_rows(job.task_type, executor_tokenizer(job), records, job.context_length, tally, workers=1):
        if job.task_type is TaskType.CONTINUED_PRETRAIN and rows.offsets[-1] < job.context_length:
            rest = rows.input_ids  # the partition's short last block: the driver joins it to the others'
            continue
        yield packed_batch(rows)
    lengths = np.concatenate(tally.lengths) if tally.lengths else np.empty(0, np.int32)
    summary = {
        "records": check.count, "errors": len(check.errors), "lengths": lengths.astype(np.int32).tobytes(),
        "truncated": tally.truncated, "dropped": tally.dropped, "rest": rest.astype(np.int32).tobytes(),
    }
    yield pa.RecordBatch.from_pylist([summary], schema=OUTPUT)


def packed_batch(rows: Rows) -> pa.RecordBatch:
    """One Spark row per packed row: each column's int32 tokens as bytes, cut at the row offsets (no copy)."""
    n = len(rows.offsets) - 1
    byte_offsets = pa.py_buffer((rows.offsets * 4).astype(np.int32))
    arrays = [
        pa.Array.from_buffers(pa.binary(), n, [None, byte_offsets, pa.py_buffer(np.ascontiguousarray(getattr(rows, c), np.int32))])
        for c in COLUMNS
    ]
    arrays += [pa.nulls(n, field.type) for field in list(OUTPUT)[len(COLUMNS):]]
    return pa.RecordBatch.from_arrays(arrays, schema=OUTPUT)
