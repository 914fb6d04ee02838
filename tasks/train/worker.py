"""The training loop `torchrun` starts, one process per rank. Imports no Prefect.

Read top to bottom: setup, the step, evaluation, saving. The train stage has already decided
everything (tessera.training.TrainJob: the exact step plan, micro-batch, precision, checkpointing);
this loop carries it out. Each step's loss is the sum over every trained token of the step (all
micro-batches, all ranks) divided by their count, which the data loader knows before the step runs;
gradients are summed over ranks once per step, so 2 processes compute what 1 process computes.

    torchrun --nproc_per_node N -m tasks.train.worker JOB.json
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tasks.train.data import PackedRows, rank_micro_batches, steps
from tasks.train.loss import loss_sum
from tasks.train.precision import autocast, compute_dtype
from tasks.train.report import Reporter, fail, progress_line
from tessera.config import TaskType
from tessera.generation import generate, prompt_ids, stop_token_ids
from tessera.training import TrainJob, lr_at


class WorkerError(Exception):
    """A failure with a message for the user (the stage shows it as the run's reason)."""


# --- setup ------------------------------------------------------------------------------------------


def load_model(job: TrainJob, device: torch.device):
    """The model in fp32 (master weights), whatever dtype it is stored in; returns (model, stored dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = job.custom_weights_path or job.model_path
    try:
        stored = AutoConfig.from_pretrained(weights).dtype or torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            weights, dtype=torch.float32, attn_implementation=job.settings.attn_implementation
        )
    except Exception as exc:  # a missing, truncated or foreign weights file: one message, not a traceback
        raise WorkerError(f"could not load the model weights from {weights}: {type(exc).__name__}: {exc}") from exc
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    if job.settings.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if job.settings.compile:
        model.base_model.compile()  # in place: parameter names (and the saved checkpoint) stay the same
    return model.to(device).train(), stored


def peak_memory(device: torch.device) -> dict[str, float]:
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


# --- the step ---------------------------------------------------------------------------------------


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum every rank's gradients, in one flat buffer. A rank with no rows this step adds zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        p.grad = g


# --- evaluation -------------------------------------------------------------------------------------


def evaluate(model, rows: PackedRows, job: TrainJob, pad_id: int, dtype, device, rank: int, world: int) -> float:
    """Mean loss per trained token over the whole eval set, each rank taking every world-th row."""
    total = torch.zeros((), device=device, dtype=torch.float64)
    model.eval()
    with torch.no_grad(), autocast(dtype, device):
        for part in rank_micro_batches(np.arange(len(rows)), rank, world, job.micro_rows):
            ids, labels, pos = (t.to(device) for t in rows.batch(part, pad_id))
            total += loss_sum(model, ids, labels, pos).double()
    model.train()
    dist.all_reduce(total)
    return float(total) / max(1, int(rows.trained.sum()))


def eval_generations(model, tokenizer, prompts: list[str], chat: bool, max_tokens: int = 64) -> list[dict]:
    """Greedy answers to the run's eval prompts (a user turn for chat models), as the endpoint gives them."""
    was_training = model.training
    model.eval()
    out = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}] if chat else prompt)
        new, finish = generate(model, tokenizer, ids, max_tokens)
        out.append({"prompt": prompt, "response": tokenizer.decode(new, skip_special_tokens=True), "finish_reason": finish})
    model.train(was_training)
    return out


# --- saving -----------------------------------------------------------------------------------------


def save(model, tokenizer, out: Path, dtype: torch.dtype) -> None:
    """The fine-tuned model in the base model's dtype, ready to generate: KV cache on, stopping on every
    token that ends an assistant turn. Written beside `out`, then renamed: never half a model."""
    model.activation_checkpointing_disable()
    model.config.use_cache = True
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(out.name + ".partial")
    model.to(dtype).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def main(job: TrainJob) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # --- setup: processes, device, model, optimizer, data ---
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(job.settings.seed)
    s, plan, report = job.settings, job.plan, Reporter(job, rank)
    dtype = compute_dtype(s.precision, device)

    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model, stored_dtype = load_model(job, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel (CUDA and CPU): one pass over each fp32 master tensor instead of a loop of small ops
    optimizer = torch.optim.AdamW(params, lr=job.learning_rate, weight_decay=s.weight_decay, fused=True)
    data = PackedRows(job.prepared_path)
    eval_rows = PackedRows(job.eval_prepared_path) if job.eval_prepared_path else None
    chat = job.task_type is TaskType.CHAT_COMPLETION
    report.params(world_size=world, device=device.type)
    report.say(
        "train",
        f"training {plan.total_steps} steps ({plan.steps_per_epoch}/epoch, {plan.rows_per_step} rows of {job.context_length} "
        f"tokens per step, {job.micro_rows} per micro-batch) on {plan.rows} rows, {world} process(es) on {device.type}, "
        f"{s.precision} compute{', activation checkpointing' if s.activation_checkpointing else ''}",
    )

    # --- the loop: one optimizer step per planned step ---
    start = window_start = time.time()
    window_loss = torch.zeros((), device=device)
    window_trained = window_tokens = 0
    for step in steps(data, plan, 0, rank, world, job.micro_rows, pad_id, device):
        lr = lr_at(step.index, plan.total_steps, job.learning_rate, s.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for ids, labels, pos in step.micro_batches:
            with autocast(dtype, device):
                loss = loss_sum(model, ids, labels, pos)
            (loss / step.trained_tokens).backward()
            window_loss += loss.detach()
        if world > 1:
            sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_trained += step.trained_tokens
        window_tokens += step.input_tokens
        done = step.index + 1
        last = done == plan.total_steps

        if done % s.log_every == 0 or last:  # the token-weighted mean loss of the window, over all ranks
            counts = torch.tensor([window_loss.item(), float(window_tokens)], dtype=torch.float64)
            dist.all_reduce(counts)
            mean_loss, tok_s = counts[0].item() / max(1, window_trained), counts[1].item() / (time.time() - window_start)
            report.metrics(done, loss=mean_loss, learning_rate=lr, tokens_per_sec=tok_s, grad_norm=float(grad_norm), **peak_memory(device))
            report.say("train", progress_line(done, plan.total_steps, mean_loss, lr, tok_s, time.time() - start))
            window_loss.zero_()
            window_trained = window_tokens = 0
            window_start = time.time()

        # --- evaluation: at every eval interval and at the end ---
        if done % s.eval_every == 0 or last:
            if job.eval_prompts and not last:  # the last step's generations come from the saved model, below
                generations = eval_generations(model, tokenizer, job.eval_prompts, chat) if rank == 0 else []
                report.artifact({"step": done, "generations": generations}, f"eval_prompts/step_{done:06d}.json")
            if eval_rows is not None:
                eval_loss = evaluate(model, eval_rows, job, pad_id, dtype, device, rank, world)
                report.metrics(done, eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50.0)))
                report.say("eval", f"eval at step {done}: loss {eval_loss:.4f} perplexity {math.exp(min(eval_loss, 50.0)):.2f}")
            window_start = time.time()  # tokens/s counts training time, not evaluation

    # --- save, then answer the eval prompts from the saved weights, as the endpoint will ---
    report.metrics(plan.total_steps, train_runtime_s=time.time() - start, **peak_memory(device))
    out = Path(job.output_dir)
    if rank == 0:
        save(model, tokenizer, out, stored_dtype)
        if job.eval_prompts:
            saved = AutoModelForCausalLM.from_pretrained(out).to(device)
            generations = eval_generations(saved, AutoTokenizer.from_pretrained(out), job.eval_prompts, chat)
            report.artifact({"step": plan.total_steps, "generations": generations}, f"eval_prompts/step_{plan.total_steps:06d}.json")
            report.say("eval", "eval prompts (saved model): " + " | ".join(g["response"] for g in generations))
    dist.barrier()
    dist.destroy_process_group()


def run(job_file: str) -> int:
    """main() with the failures a user can act on turned into one line for the train stage."""
    job = TrainJob.model_validate_json(Path(job_file).read_text())
    try:
        main(job)
    except WorkerError as exc:
        fail(str(exc))
        return 1
    except torch.OutOfMemoryError:
        fail(
            f"CUDA out of memory at {job.micro_rows * job.context_length} tokens per micro-batch: lower "
            "training_config micro_batch_tokens, set activation_checkpointing: true, or use a shorter context_length"
        )
        return 1
    except Exception as exc:
        fail(f"{type(exc).__name__}: {exc}")
        raise  # the traceback goes to the run's log
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
