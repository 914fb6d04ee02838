"""Records to packed rows, a bounded piece at a time: the pipeline that in-process prep and every Spark partition run.

    records --batches--> tokenize (threads) --> fit to the context --> pack a window --> rows

The Rust tokenizer releases the GIL, so a few threads tokenize batches in parallel while the main
thread reads and validates the next ones; this needs no process pool and does not depend on
TOKENIZERS_PARALLELISM (which our entry points turn off, for safe forking). A Tally gathers the
per-example figures of the data report as the batches stream past.

Separate from the stage so that the Spark path (tasks/prepare/spark.py) runs it on its executors without
importing the stage.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from tasks.prepare.packing import cut_blocks, pack_rows
from tasks.prepare.rows import Rows
from tasks.prepare.tokenizing import Examples, rust_tokenizer, tokenize_records
from tessera.core.config import TaskType
from tessera.core.sources import Record

BATCH_RECORDS = 512  # records per tokenizer call: enough for Rust to amortize the call, small enough to stream


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
