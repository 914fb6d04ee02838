"""The training loop `torchrun` starts, one process per rank. Imports no Prefect.

nanoGPT-style: read top to bottom. Rows come packed (examples side by side, position ids restarting
at 0 each), so the model is called with position_ids, no attention mask and no KV cache: transformers
then builds a block-causal mask and examples never attend to each other. The loss of a step is the
sum over every trained token of the step (all micro-batches, all ranks) divided by their count.

    torchrun --nproc_per_node N -m tasks.train_worker JOB.json
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from pydantic import BaseModel

from tessera.config import Duration, TaskType, TrainSettings
from tessera.generation import generate, prompt_ids
from tessera.runs import append_event

IGNORE_INDEX = -100


class TrainJob(BaseModel):
    """Everything one training run needs, written by the train stage for every rank to read."""

    run_name: str
    model_path: str
    custom_weights_path: str | None = None
    task_type: TaskType
    eval_prompts: list[str] = []
    prepared_path: str
    eval_prepared_path: str | None = None
    output_dir: str
    duration: Duration
    learning_rate: float
    settings: TrainSettings
    mlflow_tracking_uri: str
    mlflow_run_id: str


def plan_steps(d: Duration, s: TrainSettings, rows: int, tokens: int, world: int) -> tuple[int, int, int]:
    """(micro_batch_size, steps_per_epoch, total_steps) for this duration, data size and world size."""
    micro = max(1, min(s.micro_batch_size, math.ceil(rows / world)))
    rows_per_step = micro * world * s.grad_accum_steps
    steps_per_epoch = math.ceil(rows / rows_per_step)
    if d.unit == "ep":
        total = d.value * steps_per_epoch
    elif d.unit == "ba":
        total = d.value
    else:
        total = math.ceil(d.value / (tokens / steps_per_epoch))
    return micro, steps_per_epoch, max(1, total)


def row_order(rows: int, seed: int, epoch: int):
    import torch

    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def collate(rows: list[dict], pad_id: int, device):
    """Pad rows to the longest; padding is its own 'example' (positions from 0) with no loss."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        pos[i, :n] = torch.as_tensor(r["position_ids"])
        pos[i, n:] = torch.arange(width - n)
    return ids.to(device), labels.to(device), pos.to(device)


def loss_sum(model, ids, labels, pos):
    """Summed next-token cross-entropy over the trained tokens (labels != IGNORE_INDEX)."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def evaluate(model, rows, micro: int, pad_id: int, device, rank: int, world: int) -> float:
    """Mean loss per trained token over the whole eval set, each rank taking every world-th row."""
    import torch
    import torch.distributed as dist

    total = torch.zeros(2, device=device, dtype=torch.float64)
    mine = list(range(rank, len(rows), world))
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(mine), micro):
            ids, labels, pos = collate([rows[i] for i in mine[start : start + micro]], pad_id, device)
            total[0] += loss_sum(model, ids, labels, pos).double()
            total[1] += (labels[:, 1:] != IGNORE_INDEX).sum()
    model.train()
    dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def eval_generations(model, tokenizer, prompts: list[str], chat: bool, max_tokens: int = 64) -> list[dict]:
    """Greedy answers to the run's eval prompts (a user turn for chat models), as the endpoint would give them."""
    model.eval()
    out = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}] if chat else prompt)
        new, finish = generate(model, tokenizer, ids, max_tokens)
        out.append({"prompt": prompt, "response": tokenizer.decode(new, skip_special_tokens=True), "finish_reason": finish})
    model.train()
    return out


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    warmup = int(total * warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def progress_line(step: int, total: int, loss: float, lr: float, tok_s: float, elapsed: float) -> str:
    done = step / total
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
    eta = elapsed / done * (1 - done) if done else 0
    return (
        f"[{bar}] step {step}/{total} loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s "
        f"elapsed {elapsed:.0f}s eta {eta:.0f}s"
    )


def main(job_file: str) -> None:
    import torch
    import torch.distributed as dist
    from datasets import load_from_disk
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = TrainJob.model_validate_json(Path(job_file).read_text())
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(job.settings.seed)

    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    model = AutoModelForCausalLM.from_pretrained(
        job.custom_weights_path or job.model_path, dtype=torch.bfloat16 if cuda else torch.float32
    ).to(device)
    model.config.use_cache = False
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    data = load_from_disk(str(Path(job.prepared_path) / "rows"))
    eval_rows = load_from_disk(str(Path(job.eval_prepared_path) / "rows")) if job.eval_prepared_path else None
    manifest = json.loads((Path(job.prepared_path) / "manifest.json").read_text())
    n_rows, n_tokens = len(data), manifest["stats"]["tokens"]
    micro, steps_per_epoch, total_steps = plan_steps(job.duration, job.settings, n_rows, n_tokens, world)
    s = job.settings
    rows_per_step = micro * world * s.grad_accum_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.learning_rate, weight_decay=s.weight_decay)
    client = MlflowClient(job.mlflow_tracking_uri) if rank == 0 else None
    if rank == 0:
        msg = f"training {total_steps} steps ({steps_per_epoch}/epoch) on {n_rows} rows, {world} process(es), {device.type}"
        print(msg, file=sys.stderr, flush=True)
        append_event(job.run_name, "train", msg)

    orders: dict[int, object] = {}

    def row_at(g: int) -> dict:
        epoch = g // n_rows
        if epoch not in orders:
            orders.clear()
            orders[epoch] = row_order(n_rows, s.seed, epoch)
        return data[int(orders[epoch][g % n_rows])]

    start = time.time()
    window_tokens, window_start = 0, time.time()
    for step in range(total_steps):
        lr = lr_at(step, total_steps, job.learning_rate, s.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches, real = [], 0
        for a in range(s.grad_accum_steps):
            first = step * rows_per_step + a * micro * world + rank * micro
            rows = [row_at(first + i) for i in range(micro)]
            real += sum(len(r["input_ids"]) for r in rows)
            batches.append(collate(rows, tokenizer.pad_token_id or 0, device))
        trained = torch.tensor(
            [sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels, _ in batches)], device=device
        )
        dist.all_reduce(trained)
        step_loss = torch.zeros((), device=device)
        for a, (ids, labels, pos) in enumerate(batches):
            sync = nullcontext() if world == 1 or a == len(batches) - 1 else ddp.no_sync()
            with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_sum(ddp, ids, labels, pos)
                (loss * world / trained.clamp(min=1)).backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += real * world

        last = step + 1 == total_steps
        if (step + 1) % s.log_every == 0 or last:
            dist.all_reduce(step_loss)
            mean_loss = float(step_loss / trained.clamp(min=1))
            tok_s = window_tokens / max(1e-9, time.time() - window_start)
            window_tokens, window_start = 0, time.time()
            if rank == 0:
                now = int(time.time() * 1000)
                client.log_batch(
                    job.mlflow_run_id,
                    metrics=[
                        Metric("loss", mean_loss, now, step + 1),
                        Metric("learning_rate", lr, now, step + 1),
                        Metric("tokens_per_sec", tok_s, now, step + 1),
                    ],
                )
                line = progress_line(step + 1, total_steps, mean_loss, lr, tok_s, time.time() - start)
                print(line, file=sys.stderr, flush=True)
                append_event(job.run_name, "train", line)
        if not ((step + 1) % s.eval_every == 0 or last):
            continue
        if job.eval_prompts and rank == 0:
            generations = eval_generations(model, tokenizer, job.eval_prompts, job.task_type is TaskType.CHAT_COMPLETION)
            client.log_dict(job.mlflow_run_id, {"step": step + 1, "generations": generations}, f"eval_prompts/step_{step + 1:06d}.json")
            append_event(job.run_name, "eval", f"eval prompts at step {step + 1}: " + " | ".join(g["response"] for g in generations))
        if eval_rows is not None:
            eval_loss = evaluate(model, eval_rows, micro, tokenizer.pad_token_id or 0, device, rank, world)
            if rank == 0:
                now = int(time.time() * 1000)
                perplexity = math.exp(min(eval_loss, 50.0))
                client.log_batch(
                    job.mlflow_run_id,
                    metrics=[Metric("eval_loss", eval_loss, now, step + 1), Metric("eval_perplexity", perplexity, now, step + 1)],
                )
                line = f"eval at step {step + 1}: loss {eval_loss:.4f} perplexity {perplexity:.2f}"
                print(line, file=sys.stderr, flush=True)
                append_event(job.run_name, "eval", line)

    if rank == 0:
        out = Path(job.output_dir)
        tmp = out.with_name(out.name + ".partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
