"""Evaluation: a model's summed loss over a prepared eval set, with the trainer's own loss code (the trainer evaluates
with it at every eval interval, each rank taking every world-th row, and the retrain's promotion gate scores the new
version and the champion with it, so both measure the same thing); and whether a chat model still ends its turns:
greedy answers within a token budget, their stop rate and how much they repeat themselves."""

from __future__ import annotations

import numpy as np
import torch

from tasks.train.data import PackedRows, rank_micro_batches
from tasks.train.loss import loss_sum
from tasks.train.precision import autocast
from tessera.core.generation import generate
from tessera.core.training import IGNORE_INDEX

STOP_CHECK_PROMPTS = 4  # prompts from the data answered when the run gives no eval prompts
STOP_CHECK_TOKENS = 128  # a greedy answer that has not ended its turn by then counts as not stopping
REPEAT_NGRAM = 4


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


def data_prompts(rows: PackedRows, n: int) -> list[list[int]]:
    """The first `n` examples' prompts in prepared rows: each example's tokens up to its first trained one (the
    conversation through the opened assistant turn, as the template renders it for generation). Examples restart
    position_ids at 0 within a packed row; labels are the trained tokens themselves (no shift)."""
    prompts: list[list[int]] = []
    for part in rows.parts:
        for k in range(len(part.offsets) - 1):
            a, b = int(part.offsets[k]), int(part.offsets[k + 1])
            starts = np.flatnonzero(part.position_ids[a:b] == 0)
            for s, e in zip(starts, [*starts[1:], b - a]):
                trained = np.flatnonzero(part.labels[a + s:a + e] != IGNORE_INDEX)
                if len(trained):
                    prompts.append(part.input_ids[a + s:a + s + int(trained[0])].tolist())
                if len(prompts) == n:
                    return prompts
    return prompts


def greedy_answers(model, tokenizer, prompts: list[list[int]], max_tokens: int, synced_ranks: bool = False) -> list[tuple[list[int], str]]:
    """(new token ids, finish reason) of a greedy answer to each prompt, as the endpoint would give it; `synced_ranks`:
    every rank of a sharded model answers them together."""
    was_training = model.training
    model.eval()
    answers = generate(model, tokenizer, prompts, max_tokens, synced_ranks=synced_ranks)
    model.train(was_training)
    return answers


def stop_rate(answers: list[tuple[list[int], str]]) -> float:
    """The share of answers that ended their turn within the budget."""
    return sum(finish == "stop" for _, finish in answers) / max(1, len(answers))


def repeated_share(ids: list[int]) -> float:
    """The share of an answer's token 4-grams that already occurred earlier in it: 0 for varied text, near 1 for a
    loop (bench/quality.py measures with it too)."""
    grams = [tuple(ids[i:i + REPEAT_NGRAM]) for i in range(len(ids) - REPEAT_NGRAM + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def repetition(answers: list[tuple[list[int], str]]) -> float:
    """The mean repeated share (repeated_share) of the answers."""
    return sum(repeated_share(ids) for ids, _ in answers) / max(1, len(answers))
