"""Reading packed rows for the trainer: batched Arrow reads from the memory-mapped prepared data,
assembled into padded tensors on a background thread a few steps ahead of the loop.

Per-row token counts are computed once, with numpy, from the Arrow offsets and labels: the step plan
needs them, and the loss normalizer of every step (its trained tokens over all ranks) is then known
on the host before the step runs, so the loop never waits on the device to learn it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tessera.core.training import IGNORE_INDEX, StepPlan

PREFETCH_STEPS = 2


class PackedRows:
    """The prepared rows (tasks/prepare/stage.py's layout), memory-mapped."""

    def __init__(self, prepared_path: str):
        from datasets import load_from_disk

        self.table = load_from_disk(str(Path(prepared_path) / "rows")).data.table
        labels = self.table.column("labels").combine_chunks()
        offsets = labels.offsets.to_numpy()
        self.tokens = np.diff(offsets)  # real tokens of each row
        # a row's token k is trained when label k is set, k > 0: it is predicted from token k - 1
        trained = labels.values.to_numpy() != IGNORE_INDEX
        trained[offsets[:-1]] = False
        self.trained = np.add.reduceat(trained, offsets[:-1])  # prepared rows are never empty

    def __len__(self) -> int:
        return self.table.num_rows

    def batch(self, rows: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, labels, position_ids) of these rows, padded to the longest. Padding is an 'example' of
        its own (positions from 0) with no loss, so it never joins the last example's attention block."""
        taken = self.table.take(rows)
        width = int(self.tokens[rows].max())
        ids = np.full((len(rows), width), pad_id, np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, np.int64)
        pos = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
        columns = [taken.column(c).combine_chunks() for c in ("input_ids", "labels", "position_ids")]
        offsets = columns[0].offsets.to_numpy()
        values = [c.values.to_numpy() for c in columns]
        for i in range(len(rows)):
            a, b = offsets[i], offsets[i + 1]
            ids[i, : b - a], labels[i, : b - a], pos[i, : b - a] = values[0][a:b], values[1][a:b], values[2][a:b]
            pos[i, b - a :] = np.arange(width - (b - a))
        return torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos)


@dataclass
class Step:
    index: int
    micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # this rank's, on the device
    trained_tokens: int  # over all ranks: the step's loss normalizer
    input_tokens: int  # this rank's real (non-padding) tokens


def rank_micro_batches(rows: np.ndarray, rank: int, world: int, micro_rows: int) -> list[np.ndarray]:
    """This rank's share of a step's rows (every world-th), cut into micro-batches."""
    mine = rows[rank::world]
    return [mine[i : i + micro_rows] for i in range(0, len(mine), micro_rows)]


def steps(data: PackedRows, plan: StepPlan, first: int, rank: int, world: int, micro_rows: int, pad_id: int,
          device: torch.device) -> Iterator[Step]:
    """Steps first..plan.total_steps-1, read and collated PREFETCH_STEPS ahead on a background thread."""
    pin = device.type == "cuda"

    def make(index: int) -> Step:
        rows = plan.step_rows(index)
        parts = rank_micro_batches(rows, rank, world, micro_rows)
        batches = [tuple(t.pin_memory() if pin else t for t in data.batch(part, pad_id)) for part in parts]
        return Step(index, batches, int(data.trained[rows].sum()), int(sum(data.tokens[part].sum() for part in parts)))

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
