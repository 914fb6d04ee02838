"""Precision on the real model: fp32 master weights under bf16 compute, so small updates are never lost,
and bf16 compute keeps the loss within 1% of fp32's (the rule of tessera.core.run_plan.resolve_precision)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def job_for(model_dir, **settings):
    from tessera.core.config import TaskType, TrainingSettings
    from tessera.core.training import StepPlan, TrainJob

    plan = StepPlan(rows=1, rows_per_step=1, steps_per_epoch=1, total_steps=1, seed=0, tokens=1)
    return TrainJob(
        run_name="precision", model_path=str(model_dir), task_type=TaskType.CHAT_COMPLETION, prepared_path="-",
        output_dir="-", checkpoint_dir="-", context_length=128, micro_rows=1, plan=plan, learning_rate=1e-5,
        settings=TrainingSettings(**{"attn_implementation": "sdpa", **settings}),  # as the plan resolves it on a CPU
    )


def batch(vocab: int, tokens: int = 128):
    torch.manual_seed(0)
    ids = torch.randint(10, vocab, (1, tokens))
    labels = ids.clone()
    labels[0, :16] = -100  # a prompt
    return ids, labels, torch.arange(tokens)[None]


def test_bf16_compute_over_fp32_master_weights_moves_every_weight(real_model_dir):
    from tasks.train.loss import loss_sum
    from tasks.train.precision import autocast, compute_dtype
    from tasks.train.parallel import Parallelism
    from tasks.train.worker import load_model

    cpu = torch.device("cpu")
    model, stored = load_model(job_for(real_model_dir, precision="bf16"), Parallelism("ddp", 1, cpu, torch.bfloat16))
    assert stored == torch.bfloat16  # the real model is stored in bf16 ...
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # ... and trained over fp32 master weights
    before = [p.detach().clone() for p in model.parameters()]
    dtype = compute_dtype("bf16", cpu)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # short and few steps: on a CPU without native bf16 each is emulated (a 128-token step: ~30 s); AdamW's first
    # step already moves every weight by about the learning rate, which bf16 weights could not hold
    ids, labels, pos = batch(model.config.vocab_size, 32)
    for _ in range(2):
        with autocast(dtype, cpu):
            loss = loss_sum(model, ids, labels, pos)
        (loss / int((labels[:, 1:] != -100).sum())).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
    total = sum(b.numel() for b in before)
    assert changed / total >= 0.99, f"only {changed / total:.1%} of parameter elements changed"


def test_bf16_loss_is_within_1_percent_of_fp32(real_model_dir):
    from transformers import AutoModelForCausalLM

    from tasks.train.loss import loss_sum
    from tasks.train.precision import autocast

    cpu = torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    ids, labels, pos = batch(model.config.vocab_size, 256)
    with torch.no_grad():
        fp32 = float(loss_sum(model, ids, labels, pos))
        with autocast(torch.bfloat16, cpu):
            bf16 = float(loss_sum(model, ids, labels, pos))
    assert bf16 == pytest.approx(fp32, rel=0.01)
