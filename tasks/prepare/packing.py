"""Packing tokenized examples into rows (tasks/prepare/rows.py holds the rows and their layout on disk).

Chat and instruction examples are packed whole, best fit decreasing, into rows of the context length:
examples sit side by side in a row, position_ids restart at 0 for each, and the label at each example's
first position is IGNORE_INDEX (Examples.fit), so no loss crosses a boundary. Continued pretraining rows
are context-length blocks of the text (positions 0..n-1).

Separate from the stage because the Spark path packs on its executors and rebuilds Rows on the driver.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from itertools import chain

import numpy as np

from tasks.prepare.rows import Rows
from tasks.prepare.tokenizing import Examples, positions

PACK_WINDOW_TOKENS = 1 << 22  # examples packed together; ~2k rows of 2048 leave < 0.5% of row space empty


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
