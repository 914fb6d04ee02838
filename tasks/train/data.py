"""Reading packed rows for the trainer: numpy views of the memory-mapped prepared rows (tasks/prepare/rows.py, with
pyarrow alone: no `datasets`, no pandas), assembled into padded tensors on a background thread a few steps ahead of
the loop.

Per-row token counts are computed once, with numpy, from the Arrow offsets and labels: the step plan
needs them, and the loss normalizer of every step (its trained tokens over all ranks) is then known
on the host before the step runs, so the loop never waits on the device to learn it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tasks.prepare.rows import read_rows, tokens_per_row
from tessera.core.training import IGNORE_INDEX, StepPlan

PREFETCH_STEPS = 2


class PackedRows:
    """The prepared rows (tasks/prepare/rows.py), memory-mapped: numpy views of the file's record batches."""

    def __init__(self, prepared_path: str):
        self.parts = read_rows(prepared_path)
        self.first_rows = np.cumsum([0] + [len(p.offsets) - 1 for p in self.parts])  # each part's first row
        self.tokens = tokens_per_row(self.parts)  # real tokens of each row
        self.trained = np.concatenate([p.trained for p in self.parts])  # trained tokens of each row

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, labels, position_ids) of these rows, padded to the longest. Padding is an 'example' of
        its own (positions from 0) with no loss, so it never joins the last example's attention block. No rows give
        one row of one padding token: a micro-batch with nothing to train, for a rank that ran out of rows."""
        width, height = (int(self.tokens[rows].max()), len(rows)) if len(rows) else (1, 1)
        ids = np.full((height, width), pad_id, np.int64)
        labels = np.full((height, width), IGNORE_INDEX, np.int64)
        pos = np.tile(np.arange(width, dtype=np.int64), (height, 1))
        parts = np.searchsorted(self.first_rows, rows, side="right") - 1  # the record batch holding each row
        for i, (part, k) in enumerate(zip(parts, rows - self.first_rows[parts])):
            r = self.parts[part]
            a, b = r.offsets[k], r.offsets[k + 1]
            ids[i, : b - a], labels[i, : b - a], pos[i, : b - a] = r.input_ids[a:b], r.labels[a:b], r.position_ids[a:b]
            pos[i, b - a :] = np.arange(width - (b - a))
        return torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos)


@dataclass
class Step:
    index: int
    micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # this rank's, on the device
    trained_tokens: int  # over all ranks: the step's loss normalizer
    input_tokens: int  # this rank's real (non-padding) tokens
    all_input_tokens: int  # over all ranks: what the run has trained on, counted in checkpoints


def rank_micro_batches(rows: np.ndarray, rank: int, world: int, micro_rows: int) -> list[np.ndarray]:
    """This rank's share of a step's rows (every world-th), cut into micro-batches: as many on every rank (rank 0's
    count; a rank with fewer rows gets empty ones), since each forward of a sharded model is a collective."""
    mine = rows[rank::world]
    count = max(1, -(-len(rows[0::world]) // micro_rows))
    return [mine[i * micro_rows : (i + 1) * micro_rows] for i in range(count)]


def steps(data: PackedRows, plan: StepPlan, first: int, rank: int, world: int, micro_rows: int, pad_id: int,
          device: torch.device) -> Iterator[Step]:
    """Steps first..plan.total_steps-1, read and collated PREFETCH_STEPS ahead on a background thread."""
    pin = device.type == "cuda"

    def make(index: int) -> Step:
        rows = plan.step_rows(index)
        parts = rank_micro_batches(rows, rank, world, micro_rows)
        batches = [tuple(t.pin_memory() if pin else t for t in data.batch(part, pad_id)) for part in parts]
        return Step(index, batches, int(data.trained[rows].sum()), int(sum(data.tokens[part].sum() for part in parts)),
                    int(data.tokens[rows].sum()))

    ahead: queue.Queue = queue.Queue(maxsize=PREFETCH_STEPS)

    def produce() -> None:
        try:
            for index in range(first, plan.total_steps):
                ahead.put(make(index))
        except BaseException as exc:  # surfaces in the loop, not lost in the thread
            ahead.put(exc)

    threading.Thread(target=produce, name="prefetch", daemon=True).start()
    for _ in range(first, plan.total_steps):
        item = ahead.get()
        if isinstance(item, BaseException):
            raise item
        item.micro_batches = [tuple(t.to(device, non_blocking=True) for t in b) for b in item.micro_batches]
        yield item
