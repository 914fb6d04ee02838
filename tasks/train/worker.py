"""The training loop, one process per rank (started by tasks.train.standalone on one node, by torchrun over
several). Imports no Prefect and no `datasets` (the rows are read with pyarrow), and MLflow only on rank 0 when the
run logs to it (tasks/train/report.py): each rank starts fast.

Read top to bottom: setup, the step, evaluation, saving. The train stage has already decided
everything (tessera.core.training.TrainJob: the exact step plan, micro-batch, precision, checkpointing);
this loop carries it out. Each step's loss is the sum over every trained token of the step (all
micro-batches, all ranks) divided by their count, which the data loader knows before the step runs;
gradients are summed over ranks once per step, so 2 processes compute what 1 process computes.

    python -m tasks.train.standalone N tasks.train.worker JOB.json
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.train import distributed
from tasks.train.checkpoint import Checkpointer, info_now
from tasks.train.data import PackedRows, Step, steps
from tasks.train.evaluation import (
    STOP_CHECK_PROMPTS, STOP_CHECK_TOKENS, data_prompts, greedy_answers, repetition, stop_rate, summed_loss,
)
from tasks.train.loss import loss_sum
from tasks.train.parallel import Parallelism
from tasks.train.precision import autocast, compute_dtype
from tasks.train.report import PREEMPTED_EXIT, Reporter, fail, peers_lost, progress_line, say_peers_lost, write_outcome
from tessera.core import checkpoints
from tessera.core.config import TaskType
from tessera.core.generation import prompt_ids, stop_token_ids
from tessera.core.paths import replacing_dir
from tessera.core.processes import exit_when_gone, skip_final_collection
from tessera.core.training import TrainJob, lr_at, unsupported_head_feature, unsupported_model_message
from tessera.core.weights import load_sources


class WorkerError(Exception):
    """A failure with a message for the user (the stage shows it as the run's reason)."""


# --- setup ------------------------------------------------------------------------------------------


def load_model(job: TrainJob, parallel: Parallelism):
    """The model in fp32 (master weights), whatever dtype it is stored in, on the device, sharded for fsdp; returns
    (model, stored dtype). Its weights are the base model's, or the run's starting weights (custom_weights_path): a
    model directory's, or a checkpoint's (another run's: its weights only, read into the base model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    s = job.settings

    def prepare(model) -> None:
        if s.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if s.compile:
            model.base_model.compile()  # in place: parameter names (and the saved checkpoint) stay the same

    weights, checkpoint = load_sources(job.starting_weights, job.model_path)
    try:
        config = AutoConfig.from_pretrained(weights)
        stored = config.dtype or torch.float32
        if parallel.sharded:
            model = parallel.load(AutoModelForCausalLM, config, weights, s.attn_implementation, prepare)
        else:
            model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, attn_implementation=s.attn_implementation)
            prepare(model)
            model.to(parallel.device)
        if checkpoint is not None:
            weights = checkpoint
            checkpoints.load_model_weights(model, checkpoint)
    except Exception as exc:  # a missing, truncated or foreign weights file: one message, not a traceback
        raise WorkerError(f"could not load the model weights from {weights}: {type(exc).__name__}: {exc}") from exc
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    head = model.get_output_embeddings()
    if feature := unsupported_head_feature(model.config.to_dict(), head_bias=getattr(head, "bias", None) is not None):
        raise WorkerError(unsupported_model_message(weights, feature))
    return model.train(), stored


def peak_memory(device: torch.device) -> dict[str, float]:
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


# --- the step ---------------------------------------------------------------------------------------


def train_step(model, params: list[torch.Tensor], optimizer, step: Step, lr: float, dtype: torch.dtype,
               parallel: Parallelism, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches: (the summed loss of its trained tokens, the gradient norm),
    both on the device, so the loop never waits for it. Each micro-batch's loss is divided by the trained tokens of
    the whole step (all ranks), so the summed gradients are those of the step's mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=params[0].device)  # a rank may have no rows in an epoch's last step
    for ids, labels, pos in step.micro_batches:
        with autocast(dtype, ids.device):
            loss = loss_sum(model, ids, labels, pos)
        (loss / step.trained_tokens).backward()
        step_loss += loss.detach()
    parallel.sum_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # over the whole model, sharded or not
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


# --- evaluation -------------------------------------------------------------------------------------


def evaluate(model, rows: PackedRows, job: TrainJob, pad_id: int, dtype, device, rank: int, world: int) -> float:
    """Mean loss per trained token over the whole eval set, each rank taking every world-th row."""
    total = summed_loss(model, rows, pad_id, job.micro_rows, dtype, device, rank, world)
    return float(distributed.sum_over_ranks([total], device)[0]) / max(1, int(rows.trained.sum()))


def eval_prompt_ids(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """The run's eval prompts as the endpoint renders them (a user turn for chat models)."""
    return [prompt_ids(tokenizer, [{"role": "user", "content": p}] if chat else p) for p in prompts]


def eval_generations(model, tokenizer, prompts: list[str], chat: bool, synced_ranks: bool = False, max_tokens: int = 64) -> list[dict]:
    """Greedy answers to the run's eval prompts, as the endpoint gives them (by every rank together: synced_ranks)."""
    answers = greedy_answers(model, tokenizer, eval_prompt_ids(tokenizer, prompts, chat), max_tokens, synced_ranks)
    return [{"prompt": p, "response": tokenizer.decode(new, skip_special_tokens=True), "finish_reason": finish}
            for p, (new, finish) in zip(prompts, answers)]


def stop_check(model, tokenizer, prompts: list[list[int]], synced_ranks: bool = False) -> dict[str, float]:
    """Whether the model still ends its turns: the stop rate and repetition of its greedy answers."""
    answers = greedy_answers(model, tokenizer, prompts, STOP_CHECK_TOKENS, synced_ranks)
    return {"stop_rate": stop_rate(answers), "repetition": repetition(answers)}


# --- saving -----------------------------------------------------------------------------------------


def save(model, tokenizer, out: Path, dtype: torch.dtype) -> None:
    """The fine-tuned model in the base model's dtype, ready to generate: KV cache on, stopping on every
    token that ends an assistant turn. Cast in place (the training copy is not needed any more), written
    beside `out`, then put in its place: never half a model, and a re-executed run replaces its output."""
    model.activation_checkpointing_disable()
    model.config.use_cache = True
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    with replacing_dir(out) as staging:
        model.to(dtype).save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def on_sigterm() -> threading.Event:
    """Set when this process gets SIGTERM (a preemption notice, a drained node, a cancel): the loop then finishes the
    step it is on, saves a checkpoint and exits, within the grace that the train stage and its launcher give it
    before SIGKILL (tasks.train.report.SIGTERM_GRACE_S)."""
    requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: requested.set())
    return requested


def checkpoint_due(done: int, plan, every: int | None, eval_every: int) -> str | None:
    """Why a checkpoint is saved after `done` steps, if one is: at the end; every `every` steps when set; else at the
    end of every epoch, where epochs shorter than `eval_every` steps (a small dataset trained for many epochs)
    count only at the first epoch end past each multiple of `eval_every`, not a save every step or two."""
    if done == plan.total_steps:
        return "final"
    if every:
        return "interval" if done % every == 0 else None
    epoch_end = done % plan.steps_per_epoch == 0
    return "epoch" if epoch_end and done // eval_every > (done - plan.steps_per_epoch) // eval_every else None


def main(job: TrainJob) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # --- setup: processes, device, model, optimizer, data ---
    if job.owner_pid:
        exit_when_gone(job.owner_pid, job.owner_started)  # a killed flow leaves no worker training on
    stop_requested = on_sigterm()
    device = distributed.training_device()
    rank, world = distributed.init(device)
    torch.manual_seed(job.settings.seed)
    s, plan, report = job.settings, job.plan, Reporter(job, rank)
    dtype = compute_dtype(s.precision, device)
    parallel = Parallelism(s.parallelism, world, device, dtype)
    sync = parallel.every_rank_runs_forwards  # generations run on every rank, not rank 0 alone
    chat = job.task_type is TaskType.CHAT_COMPLETION

    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model, stored_dtype = load_model(job, parallel)
    params = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel (CUDA and CPU): one pass over each fp32 master tensor instead of a loop of small ops
    optimizer = torch.optim.AdamW(params, lr=job.learning_rate, weight_decay=s.weight_decay, fused=True)
    data = PackedRows(job.prepared_path)
    eval_rows = PackedRows(job.eval_prepared_path) if job.eval_prepared_path else None
    checkpointer = Checkpointer(Path(job.checkpoint_dir), model, optimizer, rank, s.keep_checkpoints, device,
                                say=lambda line: report.say("checkpoint", line))
    first, tokens_seen, base = 0, 0, None
    if (resumed := job.resume_from) is not None:  # the weights, AdamW states and RNG of the checkpoint; its step
        checkpointer.load(resumed)
        first, tokens_seen, base = resumed.step, resumed.tokens_seen, resumed.base_stop_check
        report.say("train", f"resumed from the checkpoint at {resumed.label}, {resumed.world_size} process(es) then, "
                   f"{world} now: {resumed.path}")
    else:
        report.params(world_size=world, device=device.type)
    # A chat model that stops ending its turns loops under greedy decoding, which loss alone does not show: the
    # same prompts (the run's eval prompts, else a few from the held-out data, else from the training data) are
    # answered with the base weights now (not again on a resume: the checkpoint kept the result) and with the saved
    # ones at the end.
    stop_prompts = []
    if chat and (rank == 0 or sync):
        stop_prompts = (eval_prompt_ids(tokenizer, job.eval_prompts, chat) if job.eval_prompts
                        else data_prompts(eval_rows or data, STOP_CHECK_PROMPTS))
        if base is None:
            base = stop_check(model, tokenizer, stop_prompts, sync)
            parallel.settle(model)
            report.metrics(0, **{f"base_{k}": v for k, v in base.items()})
    report.say(
        "train",
        f"training {plan.total_steps} steps ({plan.steps_per_epoch}/epoch, {plan.rows_per_step} rows of {job.context_length} "
        f"tokens per step, {job.micro_rows} per micro-batch) on {plan.rows} rows, {world} process(es) on {device.type}, "
        f"{s.precision} compute, {s.parallelism}{', activation checkpointing' if s.activation_checkpointing else ''}",
    )

    # --- the loop: one optimizer step per planned step ---
    start = window_start = time.time()
    window_loss = torch.zeros((), device=device)
    window_trained = window_tokens = 0
    mean_loss = eval_loss = None
    for step in steps(data, plan, first, rank, world, job.micro_rows, pad_id, device):
        lr = lr_at(step.index, plan.total_steps, job.learning_rate, s.warmup_ratio)
        step_loss, grad_norm = train_step(model, params, optimizer, step, lr, dtype, parallel, s.max_grad_norm)
        window_loss += step_loss
        window_trained += step.trained_tokens
        window_tokens += step.input_tokens
        tokens_seen += step.all_input_tokens
        done = step.index + 1
        last = done == plan.total_steps

        if done % s.log_every == 0 or last:  # the token-weighted mean loss of the window, over all ranks
            loss_sum_all, tokens_all = distributed.sum_over_ranks([window_loss, window_tokens], device).tolist()
            mean_loss, tok_s = loss_sum_all / max(1, window_trained), tokens_all / (time.time() - window_start)
            report.metrics(done, loss=mean_loss, learning_rate=lr, tokens_per_sec=tok_s, grad_norm=float(grad_norm), **peak_memory(device))
            elapsed = time.time() - start
            report.say("train", progress_line(done, plan.total_steps, mean_loss, lr, tok_s, elapsed, first))
            report.eta(elapsed / (done - first) * (plan.total_steps - done))
            window_loss.zero_()
            window_trained = window_tokens = 0
            window_start = time.time()

        # --- evaluation: at every eval interval, at every checkpoint and at the end ---
        checkpoint = checkpoint_due(done, plan, s.checkpoint_every, s.eval_every)
        if done % s.eval_every == 0 or checkpoint:
            if job.eval_prompts and not last:  # the last step's generations come from the saved model, below
                report.generations(done, eval_generations(model, tokenizer, job.eval_prompts, chat, sync) if rank == 0 or sync else [])
            if eval_rows is not None:
                eval_loss = evaluate(model, eval_rows, job, pad_id, dtype, device, rank, world)
                report.metrics(done, eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50.0)))
                report.say("eval", f"eval at step {done}: loss {eval_loss:.4f} perplexity {math.exp(min(eval_loss, 50.0)):.2f}")
            parallel.settle(model)
            window_start = time.time()  # tokens/s counts training time, not evaluation

        # --- checkpoints: written in the background while the next steps train ---
        checkpointer.poll()
        preempted = distributed.any_rank(stop_requested.is_set(), device) and not last
        if checkpoint or preempted:
            info = info_now(done, plan, tokens_seen, world, "preempted" if preempted else checkpoint, mean_loss,
                            eval_loss if checkpoint else None, base, model.config.to_dict())
            checkpointer.save(info, wait=preempted or last)
        if preempted:
            report.say("train", f"stopped by SIGTERM after step {done}/{plan.total_steps}; the checkpoint to resume from is saved")
            dist.destroy_process_group()
            return PREEMPTED_EXIT
    checkpointer.wait()

    # --- save, then answer the eval prompts with the saved weights, as the endpoint will ---
    # the peak of the process that needed the most (rank 0 also read the whole weights file to broadcast it)
    report.metrics(plan.total_steps, train_runtime_s=time.time() - start, **distributed.max_over_ranks(peak_memory(device), device))
    # The AdamW states (8 bytes a parameter) go first. The eval prompts are answered by the training model
    # itself, which save() has cast in place to the weights it wrote: loading a second copy beside it and the
    # optimizer is what runs a GPU out of memory after a successful training (../shared/PITFALLS.md 18). A sharded
    # model is gathered whole to rank 0's CPU for it.
    del optimizer, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out = Path(job.output_dir)
    whole = parallel.full_model(model, AutoModelForCausalLM, s.attn_implementation)
    if rank == 0:
        model = whole
        save(model, tokenizer, out, stored_dtype)
        model.to(device)
        saved_tokenizer = AutoTokenizer.from_pretrained(out)
        if job.eval_prompts:
            generations = eval_generations(model, saved_tokenizer, job.eval_prompts, chat)
            report.generations(plan.total_steps, generations)
            report.say("eval", "eval prompts (saved model): " + " | ".join(g["response"] for g in generations))
        if stop_prompts:
            final = stop_check(model, saved_tokenizer, stop_prompts)
            report.metrics(plan.total_steps, **{f"eval_{k}": v for k, v in final.items()})
            if final["stop_rate"] < base["stop_rate"]:
                report.say("eval", f"warning: the fine-tuned model ended {final['stop_rate']:.0%} of its greedy answers to "
                           f"{len(stop_prompts)} prompts within {STOP_CHECK_TOKENS} tokens, the base model "
                           f"{base['stop_rate']:.0%}: it may loop under greedy decoding (temperature 0); try a lower "
                           "learning_rate or fewer epochs")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def run(job_file: str) -> int:
    """carry_out() the job; under Spark's launcher (job.outcome_dir), this rank's outcome is also written down for the
    launcher to check, since TorchDistributor reports no rank's failure (tasks.train.spark_launcher)."""
    job = TrainJob.model_validate_json(Path(job_file).read_text())
    code = 1  # unless carry_out returns: an exception on its way out
    try:
        code = carry_out(job)
        return code
    finally:
        if job.outcome_dir:
            write_outcome(job.outcome_dir, code)


def carry_out(job: TrainJob) -> int:
    """main() with the failures a user can act on turned into one line for the train stage."""
    try:
        return main(job)
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
        if peers_lost(exc):
            say_peers_lost(exc)
        else:
            fail(f"{type(exc).__name__}: {exc}")
        raise  # the traceback goes to the run's log


if __name__ == "__main__":
    try:
        sys.exit(run(sys.argv[1]))
    finally:
        skip_final_collection()
