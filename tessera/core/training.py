"""What every stage agrees on about training: the ignore index, the step plan and the job the worker runs.

The step plan is exact: an epoch is a seeded permutation of the packed rows, cut into steps of
`rows_per_step` (the last step of an epoch may be smaller); nothing crosses an epoch boundary. The data
report and the trainer both read their numbers from it, so the estimate is what the trainer runs.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel

from tessera.core.checkpoints import CheckpointInfo
from tessera.core.config import Duration, TaskType, TrainingSettings
from tessera.core.weights import StartingWeights

IGNORE_INDEX = -100  # labels of tokens that carry no loss (prompts, padding, the first token of an example)

# The fused loss (tasks/train/loss.py) makes the logits of this many bytes of fp32 at a time; the memory plan
# (tessera/core/memory.py, which must not import torch) counts the same chunk.
LOSS_CHUNK_BYTES = 256 * 1024**2


def loss_chunk_tokens(vocab_size: int) -> int:
    """Trained positions in one chunk of the fused loss (at least 64)."""
    return max(64, LOSS_CHUNK_BYTES // (4 * vocab_size))

# Output-layer features the fused loss (tasks/train/loss.py) does not compute: it takes the logits as
# hidden @ head_weight.T, so a model with one of these would train on another function than the one it serves.
UNSUPPORTED_HEAD_FEATURES = {
    "final_logit_softcapping": "final logit soft-capping (final_logit_softcapping, as in Gemma 2)",
    "logit_scale": "a logit scale (logit_scale, as in Cohere)",
}


def unsupported_head_feature(config: dict, head_bias: bool = False) -> str | None:
    """What in a model's config (or its head) the trainer cannot train faithfully; None when nothing."""
    for key, feature in UNSUPPORTED_HEAD_FEATURES.items():
        if config.get(key) not in (None, 1, 1.0):  # a scale of 1 changes nothing
            return feature
    return "a bias on the output layer (lm_head)" if head_bias else None


def unsupported_model_message(model: str, feature: str) -> str:
    return (f"model {model}: {feature} is not supported by Tessera's trainer yet (its fused loss computes the "
            "logits as hidden states x output weights); choose a model without it")


def epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: the same on every rank and in every process."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


class StepPlan(BaseModel):
    rows: int  # packed rows in an epoch
    rows_per_step: int  # the global batch, in rows
    steps_per_epoch: int
    total_steps: int
    seed: int
    tokens: int  # non-padding input tokens the whole run trains on

    @property
    def epochs(self) -> float:
        full, part = divmod(self.total_steps, self.steps_per_epoch)
        last = min(self.rows, part * self.rows_per_step)
        return full + last / self.rows

    def step_rows(self, step: int) -> np.ndarray:
        """Indices of the rows optimizer step `step` (0-based) trains on, over all ranks."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return epoch_order(self.rows, self.seed, epoch)[k * self.rows_per_step : (k + 1) * self.rows_per_step]


def plan_steps(duration: Duration, row_tokens: np.ndarray, rows_per_step: int, seed: int) -> StepPlan:
    """The exact steps of a run: `ep` whole epochs, `ba` optimizer steps, `tok` the fewest steps that reach
    that many tokens. `row_tokens[i]` is the number of real tokens in packed row i."""
    rows = len(row_tokens)
    if rows == 0:
        raise ValueError("no rows to train on")
    rows_per_step = min(rows_per_step, rows)
    steps_per_epoch = math.ceil(rows / rows_per_step)
    epoch_tokens = int(row_tokens.sum())
    if duration.unit == "ep":
        total = duration.value * steps_per_epoch
    elif duration.unit == "ba":
        total = duration.value
    else:
        full_epochs, rest = divmod(duration.value, epoch_tokens)
        total = full_epochs * steps_per_epoch
        if rest:
            order = epoch_order(rows, seed, full_epochs)
            per_step = np.add.reduceat(row_tokens[order], np.arange(0, rows, rows_per_step))
            total += int(np.searchsorted(np.cumsum(per_step), rest)) + 1
    plan = StepPlan(rows=rows, rows_per_step=rows_per_step, steps_per_epoch=steps_per_epoch, total_steps=total, seed=seed, tokens=0)
    full, part = divmod(total, steps_per_epoch)
    tokens = full * epoch_tokens
    if part:
        tokens += int(row_tokens[epoch_order(rows, seed, full)[: part * rows_per_step]].sum())
    return plan.model_copy(update={"tokens": tokens})


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warmup over `warmup_ratio` of the steps up to the peak, then linear decay toward 0 (the last step
    still trains, at peak / (steps after warmup))."""
    warmup = int(total * warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


class TrainJob(BaseModel):
    """Everything one training run needs, written by the train stage for every rank to read.
    `settings` are resolved: no field is None but where None is a choice (checkpoint_every, checkpoint_dir)."""

    run_name: str
    model_path: str
    starting_weights: StartingWeights | None = None  # custom_weights_path, resolved: else the base model's weights
    task_type: TaskType
    eval_prompts: list[str] = []
    prepared_path: str
    eval_prepared_path: str | None = None
    output_dir: str
    context_length: int
    micro_rows: int  # packed rows per process per forward/backward pass
    plan: StepPlan
    learning_rate: float
    settings: TrainingSettings
    checkpoint_dir: str  # this run's checkpoints (tessera.core.checkpoints)
    resume_from: CheckpointInfo | None = None  # continue from this checkpoint: its step, weights, optimizer, RNG
    spark_cluster: str | None = None  # training_config launcher spark: the cluster TorchDistributor runs the processes on
    outcome_dir: str | None = None  # where each rank writes how it ended (Spark's launcher checks every rank's)
    owner_pid: int | None = None  # the train stage's process: the workers exit when it is gone (a killed flow)
    owner_started: float | None = None

    def owned_here(self, **update) -> TrainJob:
        """This job (with `update`) owned by this process: the workers started for it exit when this process is gone."""
        import os

        from tessera.core.processes import create_time

        return self.model_copy(update={**update, "owner_pid": os.getpid(), "owner_started": create_time(os.getpid())})
