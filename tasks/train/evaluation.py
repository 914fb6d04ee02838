"""The evaluation loop: a model's summed loss over a prepared eval set, with the trainer's own loss code. The
trainer evaluates with it at every eval interval (each rank taking every world-th row), and the retrain's
promotion gate scores the new version and the champion with it, so both measure the same thing."""

from __future__ import annotations

import numpy as np
import torch

from tasks.train.data import PackedRows, rank_micro_batches
from tasks.train.loss import loss_sum
from tasks.train.precision import autocast


def summed_loss(model, rows: PackedRows, pad_id: int, micro_rows: int, dtype: torch.dtype, device: torch.device,
                rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's share of the loss summed over the trained tokens of `rows` (float64, on `device`): no dropout, no
    gradients. Summed over the ranks and divided by rows.trained.sum(), it is the mean loss per trained token."""
    was_training = model.training
    total = torch.zeros((), device=device, dtype=torch.float64)
    model.eval()
    with torch.no_grad(), autocast(dtype, device):
        for part in rank_micro_batches(np.arange(len(rows)), rank, world, micro_rows):
            ids, labels, pos = (t.to(device) for t in rows.batch(part, pad_id))
            total += loss_sum(model, ids, labels, pos).double()
    model.train(was_training)
    return total
