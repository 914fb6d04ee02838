"""Scoring for the gate: a model's loss on the pinned eval set with the trainer's evaluation loop
(tasks.train.evaluation), as its own tokenizer reads it, and what is compared: per trained token when both models read
the same tokens, else bits per byte of the trained text."""

from __future__ import annotations

import math

from pydantic import BaseModel

from tasks.prepare.stage import PreparedData
from tessera.core.config import RunConfig, TaskType

BITS_PER_BYTE = "eval_bits_per_byte"  # what decides instead when the two models' tokenizers differ
EVAL_MICRO_ROWS = 4


class Score(BaseModel):
    """A model's loss on an eval set as its own tokenizer reads it: summed over the trained tokens (nats), and how
    many they are."""

    loss_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        """Mean per trained token."""
        return self.loss_sum / max(1, self.tokens)


def score_on(model, prepared_path: str, pad_id: int = 0, micro_rows: int = EVAL_MICRO_ROWS) -> Score:
    """The loss over the whole prepared set, in fp32 (the trainer's evaluation loop)."""
    import torch

    from tasks.train.data import PackedRows
    from tasks.train.evaluation import summed_loss

    rows = PackedRows(prepared_path)
    model = model.float()
    total = summed_loss(model, rows, pad_id, micro_rows, torch.float32, next(model.parameters()).device)
    return Score(loss_sum=float(total), tokens=int(rows.trained.sum()))


def registered_score(model_uri: str, prepared: PreparedData) -> Score:
    from tasks.serve.loading import load_registered

    loaded = load_registered(model_uri)
    return score_on(loaded.model, prepared.path, loaded.tokenizer.pad_token_id or 0)


def base_score(folder: str, prepared: PreparedData, checkpoint: str | None = None) -> Score:
    """The score of the model a run started from: a Hugging Face folder, with a checkpoint's weights over it when
    the run started from one (tessera.core.weights.load_sources)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tessera.core.checkpoints import load_model_weights

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if checkpoint is not None:
        load_model_weights(model, checkpoint)
    if torch.cuda.is_available():
        model.to("cuda")
    return score_on(model, prepared.path, model.config.pad_token_id or 0)


def metric_value(metric: str, loss: float) -> float:
    return loss if metric == "eval_loss" else math.exp(min(loss, 50.0))


def trained_texts(task_type: TaskType, data: dict) -> list[str]:
    """What the loss is taken on, as the user wrote it: a chat's assistant turns, a response, a document."""
    if task_type is TaskType.CHAT_COMPLETION:
        return [m["content"] for m in data["messages"] if m["role"] == "assistant"]
    if task_type is TaskType.INSTRUCTION_FINETUNE:
        return [data["response"] if "response" in data else data["completion"]]
    return [data["text"]]


def trained_text_bytes(config: RunConfig, data_path: str) -> int:
    """UTF-8 bytes of the trained text of `data_path`, without template markup: the same for every tokenizer."""
    from tessera.core.records import valid_records

    records = valid_records(data_path, config.task_type)
    return sum(len(text.encode()) for r in records for text in trained_texts(config.task_type, r.data))


def eval_set_for(config: RunConfig, base: str, eval_prepared: PreparedData) -> PreparedData:
    """The eval set as a model trained from `base` reads it: its own tokenizer and template, the same context length
    (the challenger's rows when `base` is the challenger's base model)."""
    from tasks.prepare.stage import prepare

    if base == config.model:
        return eval_prepared
    return prepare(config.model_copy(update={"model": base}), config.eval_data_path, eval_prepared.stats.context_length)


def compared(metric: str, challenger: Score, incumbent: Score, text_bytes: int | None) -> tuple[str, float, float]:
    """What decides, and both values. `metric` per trained token when both models read the eval set as the same
    tokens (text_bytes None). When their tokenizers differ, per-token means are over different tokens (a finer
    tokenizer has more, each easier to predict), so bits per byte decide: the summed loss over the trained tokens,
    in bits, divided by the UTF-8 bytes of the trained text, which both models were scored on."""
    if text_bytes is None:
        return metric, metric_value(metric, challenger.loss), metric_value(metric, incumbent.loss)
    per_byte = math.log(2) * max(1, text_bytes)
    return BITS_PER_BYTE, challenger.loss_sum / per_byte, incumbent.loss_sum / per_byte
