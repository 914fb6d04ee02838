"""Training benchmark: our trainer (the train stage itself) side by side with what a user would run instead.

    python bench/train.py                          # tiny Llama (4 x 256, 32k vocabulary, random init), context 512,
                                                   #   one epoch: ours against transformers.Trainer, same packed rows
    python bench/train.py --model /tmp/smol/hf     # a real model (a directory, or a catalog name such as
                                                   #   tessera/smollm2-135m-instruct), context 1024, one epoch:
                                                   #   ours against TRL's SFTTrainer on the same conversations (~20 min)
    python bench/train.py --model M --steps 3      # both sides stop after the same 3 optimizer steps (minutes)
    python bench/train.py --repeat 2               # ours, peer, ours, peer: each side's fastest run counts
    python bench/train.py --threads 1              # OMP_NUM_THREADS=1 for both sides (a busy shared machine)

The data is bench/chat_data.py's 175 chat conversations (one fixed system prompt, a question about a Python
standard-library function or class, its docstring as the answer: ~49k tokens with SmolLM2's tokenizer, the longest
~1,000), written to --work. The tiny model's tokenizer is a 32k byte-level BPE trained on that data, with
tessera.core.tiny_model's ChatML template; the model is saved in fp32 beside it.

Each side runs in a fresh process, one after the other, so that its peak RSS is its own; both sides get the same
rows or conversations, context length, global batch, steps and peak learning rate:
  ours     the product's train stage, not a copy: tasks.prepare.stage.prepare (a cache hit: the bench prepared the data
           first), then tasks.train.stage.train: plan_run (memory plan, step plan, precision), an MLflow run in the
           bench's own store, torchrun and its worker (tasks/train/worker.py). Its figures are the worker's own, read
           back from MLflow (train_runtime_s, peak_rss_mb, loss); its precision is the plan's (`auto`: bf16 autocast
           over fp32 weights on a CPU with AMX/AVX-512 BF16, else fp32), logged every step (log_every 1).
  trainer  (tiny model) transformers.Trainer on the very rows ours trained on (prepared/rows: input_ids, labels with
           our loss masks, position_ids restarting at each packed example), padded as ours pads and with no attention
           mask, so the model keeps packed examples apart exactly as ours does (use_cache off); max_steps = our steps,
           our peak learning rate, warmup share, clipping and weight decay; bf16=True (autocast over fp32 weights)
           when ours runs bf16; its default optimizer (adamw_torch_fused). Its row order is its own (seed 0), so its
           losses are close to ours, not equal.
  trl      (--model) TRL's SFTTrainer as a user would pick it: its defaults plus use_cpu=True, packing=True,
           max_length=<context>, num_train_epochs=1 (its default is 3), logging_steps=1 (for the first loss), our
           peak learning rate; it tokenizes and packs the same JSONL its own way (bfd, padding-free), trains on every
           token (its default), bf16 autocast over fp32 weights with gradient checkpointing (its defaults). With
           --steps both stop after N optimizer steps, else each runs its own one epoch.
Both peers get our global batch in rows (trl: rows of up to max_length tokens): per_device_train_batch_size x
gradient_accumulation_steps = our rows per step. --peer-split user (the default) keeps their default per-device
batch of 8 rows, or the largest divisor of our rows per step below it (what a user who sets only the global batch
gets); --peer-split ours copies our memory plan's micro-batch instead (which, for TRL's padding-free batches, also
shortens the one flattened sequence its attention runs over). The tiny bench fixes the global batch at 8 rows.

The figures of each side's table:
  steps        optimizer steps run
  tokens       non-padding input tokens trained on (ours: the step plan's; trainer/trl: each batch's, counted when
               the model's forward takes it, so a batch the dataloader collated ahead but never trained is not)
  loop s       wall time of the training loop: from just before the first step to the end of the last one (reading
               batches, forward, backward, clipping, optimizer step and every step's logging in; process start,
               imports, model load, tokenizing/packing, optimizer creation and saving out). ours: the worker's
               train_runtime_s; trainer/trl: on_train_begin to the last step's on_step_end / on_log callback.
  tokens/s     tokens / loop s
  e2e s        the side's whole process, start to exit, as this script sees it (ours: prepare's cache hit, planning,
               MLflow, torchrun, worker start, model load, loop, saving the fine-tuned model; trainer/trl: imports,
               reading the data, model load, tokenizing/packing (trl), loop; neither saves a model)
  peak RSS MB  ru_maxrss of the process that trains (ours: the torchrun worker, at the end of its loop; trainer/trl:
               the side's process, after train())
  loss         the first and the last step's mean loss per trained token (ours and trainer: assistant tokens;
               trl: every token)
Under each table: the batch split, precision and options each side ran with, and the load average before it ran
(other work on the machine slows a side; compare runs made under a similar load).
The last line is the summary: `train ours/trainer=<x> peak_rss_mb=<n>` (tiny model) or
`train ours/trl=<y> peak_rss_mb=<n> trl_peak_rss_mb=<m>` (--model): x and y are ours tokens/s over the peer's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_CONTEXT = 512
REAL_CONTEXT = 1024
VOCAB_SIZE = 32_000
CONVERSATIONS = 175
# The tiny bench's global batch: 8 rows, a whole number of our micro-batches (the memory plan's: 4 rows of 512 on
# CPU) and the peers' default per-device batch, so either split (--peer-split) is exact; the plan's own default
# here, rows // 8 = 11 rows, is prime. With --model the plan's own default global batch is kept.
TINY_BATCH_ROWS = 8
TINY_LR = 1e-3  # random init: a rate at which the loss visibly falls
REAL_LR = 2e-5  # TRL's default
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
}


# --- set-up: data and the tiny model -----------------------------------------------------------------------


def build_tiny_model(data: Path, out: Path, context_length: int) -> Path:
    """A 4-layer, 256-wide Llama with a 32k vocabulary, random init (seed 0), saved in fp32 beside a 32k byte-level
    BPE trained on the data's text and tessera.core.tiny_model's ChatML template (end of turn = EOS)."""
    if (out / "config.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tessera.core.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS

    def texts():
        with open(data) as f:
            for line in f:
                yield from (m["content"] for m in json.loads(line)["messages"])

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token=None,
                                        chat_template=CHAT_TEMPLATE, model_max_length=context_length)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=context_length, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def plain_model_dir(model_dir: Path, work: Path) -> Path:
    """The directory itself, or, when its config.json still carries what transformers' GGUF loader adds (a GGUF
    conversion saved by hand, like /tmp/smol/hf), a copy without those keys (the weights linked, not copied):
    otherwise transformers takes the model for a quantized one and Trainer refuses to fine-tune it. Both sides
    train from the same directory. tessera.core.smollm2 writes its catalog model without them."""
    from tessera.core.smollm2 import GGUF_LEFTOVERS

    config = json.loads((model_dir / "config.json").read_text())
    if not any(k in config for k in GGUF_LEFTOVERS):
        return model_dir
    out = work / "models" / (model_dir.parent.name + "-" + model_dir.name)
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in model_dir.iterdir():
            if f.name != "config.json" and not (out / f.name).exists():
                (out / f.name).symlink_to(f.resolve())
        plain = {k: v for k, v in config.items() if k not in GGUF_LEFTOVERS}
        (out / "config.json").write_text(json.dumps(plain, indent=2))
    print(f"{model_dir}: its config.json has the GGUF loader's {', '.join(k for k in GGUF_LEFTOVERS if k in config)}; "
          f"both sides use {out} (the same weights, without them)", flush=True)
    return out


def count_tokens(data: Path, model_dir: str) -> tuple[int, int, int]:
    """(conversations, tokens, longest) of the data rendered with the model's chat template and tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(data) as f:
        chats = [json.loads(line)["messages"] for line in f]
    lengths = [len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=False)) for m in chats]
    return len(lengths), sum(lengths), max(lengths)


def run_config(spec: dict):
    from tessera.core.config import build_run_config

    steps = spec["steps"]
    return build_run_config(
        model=spec["model"], train_data_path=spec["data"], register_to="bench.train.m", context_length=spec["context_length"],
        training_duration=f"{steps}ba" if steps else "1ep", learning_rate=spec["learning_rate"],
        training_config={"log_every": 1, **spec["training_config"]},
    )


def planned(spec: dict, prepared) -> dict:
    """What the train stage will decide (tessera.core.run_plan.plan_run, the call it makes): what the peer copies."""
    from tasks.prepare.stage import row_tokens
    from tessera.core.catalog import resolve_model
    from tessera.core.run_plan import plan_run

    config = run_config(spec)
    plan = plan_run(config, resolve_model(config.model, config.context_length), row_tokens(prepared.path),
                    prepared.stats.context_length)
    s = plan.settings
    return {
        "steps": plan.steps.total_steps, "rows_per_step": plan.steps.rows_per_step, "micro_rows": plan.micro_rows,
        "learning_rate": plan.learning_rate, "precision": s.precision, "warmup_ratio": s.warmup_ratio,
        "max_grad_norm": s.max_grad_norm, "weight_decay": s.weight_decay,
    }


# --- the sides, each run in its own process ---------------------------------------------------------------


def rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def side_ours(spec: dict) -> dict:
    """The train stage as the flow calls it; the worker's own figures come back through MLflow."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")  # the worker's lines, relayed
    from tessera.core.paths import apply_engine_defaults

    apply_engine_defaults()
    from mlflow import MlflowClient

    from tasks.prepare.stage import prepare
    from tasks.train.stage import train_model
    from tasks.validate import data_report
    from tessera.core import runs
    from tessera.core.paths import mlflow_tracking_uri
    from tessera.core.run_plan import resolve_run
    from tessera.core.training import TrainJob

    config = run_config(spec)
    runs.save(runs.RunRecord(config=config, created_at=runs.now()))
    run = resolve_run(config)
    prepared = prepare(config)  # the bench prepared it already: a cache hit
    report = data_report(run, prepared)  # the plan the stage runs, as in the flow
    start = time.perf_counter()
    trained = train_model.fn(run, prepared, report)
    stage_s = time.perf_counter() - start
    job = TrainJob.model_validate_json(runs.job_file(config.name).read_text())
    client = MlflowClient(mlflow_tracking_uri())

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(trained.mlflow_run_id, key), key=lambda m: (m.step, m.timestamp))]

    loss = history("loss")
    shutil.rmtree(trained.model_dir, ignore_errors=True)  # the fine-tuned model: not needed, and 0.3-0.5 GB
    s = job.settings
    return {
        "steps": job.plan.total_steps, "tokens": job.plan.tokens, "loop_s": history("train_runtime_s")[-1],
        "peak_rss_mb": round(max(history("peak_rss_mb"))), "loss_first": loss[0], "loss_last": loss[-1],
        "stage_s": stage_s, "rows_per_step": job.plan.rows_per_step, "micro_rows": job.micro_rows, "rows": job.plan.rows,
        "learning_rate": job.learning_rate, "precision": s.precision, "activation_checkpointing": s.activation_checkpointing,
        "warmup_ratio": s.warmup_ratio, "max_grad_norm": s.max_grad_norm, "weight_decay": s.weight_decay,
        "detail": f"{job.plan.rows_per_step} rows/step in micro-batches of {min(job.micro_rows, job.plan.rows_per_step)} "
                  f"(plan: up to {job.micro_rows}), {s.precision} autocast"
                  f"{' over fp32 weights' if s.precision == 'bf16' else ''}, activation checkpointing "
                  f"{'on' if s.activation_checkpointing else 'off'}, fused AdamW, loss fused with the head on trained tokens only",
    }


class Clock:
    """A TrainerCallback timing the loop: from on_train_begin to the end of the last step (its on_step_end or the
    on_log right after it), and keeping each step's logged loss."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.start = self.end = None
                self.losses = []

            def on_train_begin(self, args, state, control, **kw):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.end = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))
                    self.end = time.perf_counter()

        return _Clock()


class TokenCounter:
    """Non-padding input tokens of the batches the model actually trained on. The collator reports each batch's
    count, the model's forward pre-hook takes them in order: accelerate's dataloader collates one batch ahead
    (to know where an epoch ends), so counting in the collator alone would count a batch never trained on."""

    def __init__(self, model):
        import collections

        self.pending, self.tokens = collections.deque(), 0
        model.register_forward_pre_hook(self._forward, with_kwargs=True)

    def collated(self, n: int) -> None:
        self.pending.append(n)

    def _forward(self, module, args, kwargs):
        if module.training and self.pending:
            self.tokens += self.pending.popleft()


def divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


PEER_DEFAULT_BATCH = 8  # per_device_train_batch_size's default in transformers.TrainingArguments and TRL's SFTConfig


def peer_split(spec: dict) -> tuple[int, int]:
    """(per_device_train_batch_size, gradient_accumulation_steps) giving our rows per step. `user`: the peer's
    default per-device batch (8) or the largest divisor of our rows per step below it, accumulation for the rest:
    what a user who sets only the global batch gets. `ours`: our memory plan's micro-batch."""
    ours = spec["ours"]
    cap = ours["micro_rows"] if spec["peer_split"] == "ours" else PEER_DEFAULT_BATCH
    per_device = divisor_at_most(ours["rows_per_step"], cap)
    return per_device, ours["rows_per_step"] // per_device


def side_trainer(spec: dict) -> dict:
    """transformers.Trainer on our packed rows, our global batch, steps and learning rate."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from tessera.core.training import IGNORE_INDEX

    ours = spec["ours"]
    rows = datasets.load_from_disk(str(Path(spec["prepared_path"]) / "rows"))
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])  # stored fp32: fp32 master weights, like ours
    model.config.use_cache = False  # else transformers lets packed examples attend to each other (STACK.md)
    pad_id = spec["pad_id"]
    counter = TokenCounter(model)

    def collate(features: list[dict]) -> dict:
        """Pad to the longest row as ours does: pad ids, no loss, positions restarting at 0; no attention mask, so
        transformers builds the block-causal mask from position_ids (packed examples kept apart)."""
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        pos = torch.arange(width).repeat(len(features), 1)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], pos[i, :n] = (torch.tensor(f[c]) for c in ("input_ids", "labels", "position_ids"))
            pos[i, n:] = torch.arange(width - n)
        counter.collated(sum(len(f["input_ids"]) for f in features))
        return {"input_ids": ids, "labels": labels, "position_ids": pos}

    per_device, accumulation = peer_split(spec)
    clock = Clock()
    args = TrainingArguments(
        output_dir=spec["work"] + "/trainer-out", use_cpu=True, bf16=ours["precision"] == "bf16",
        per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation, max_steps=ours["steps"],
        learning_rate=ours["learning_rate"], lr_scheduler_type="linear", warmup_steps=int(ours["steps"] * ours["warmup_ratio"]),
        weight_decay=ours["weight_decay"], max_grad_norm=ours["max_grad_norm"], logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=spec["seed"], dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[clock])
    result = trainer.train()
    return {
        "steps": result.global_step, "tokens": counter.tokens, "loop_s": clock.end - clock.start, "peak_rss_mb": rss_mb(),
        "loss_first": clock.losses[0], "loss_last": clock.losses[-1],
        "detail": f"{per_device} rows x {accumulation} accumulation, {'bf16 autocast' if args.bf16 else 'fp32'}, "
                  f"optim {args.optim.value if hasattr(args.optim, 'value') else args.optim}",
    }


def side_trl(spec: dict) -> dict:
    """TRL's SFTTrainer with its defaults plus use_cpu, packing and max_length; our global batch in rows."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    ours = spec["ours"]
    conversations = datasets.load_dataset("json", data_files=spec["data"], split="train",
                                          cache_dir=spec["work"] + "/hf-cache")
    per_device, accumulation = peer_split(spec)
    clock = Clock()
    args = SFTConfig(
        output_dir=spec["work"] + "/trl-out", use_cpu=True, packing=True, max_length=spec["context_length"],
        num_train_epochs=1, max_steps=spec["steps"] or -1, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, learning_rate=ours["learning_rate"], logging_steps=1, seed=spec["seed"],
    )
    setup = time.perf_counter()
    trainer = SFTTrainer(model=spec["model_dir"], args=args, train_dataset=conversations, callbacks=[clock])
    setup = time.perf_counter() - setup
    counter, collate = TokenCounter(trainer.model), trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")  # padding-free (packing bfd): no mask, every token is real
        counter.collated(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting  # train() builds its dataloader from trainer.data_collator
    result = trainer.train()
    return {
        "steps": result.global_step, "tokens": counter.tokens, "loop_s": clock.end - clock.start, "peak_rss_mb": rss_mb(),
        "loss_first": clock.losses[0], "loss_last": clock.losses[-1], "rows": len(trainer.train_dataset),
        "detail": f"{per_device} rows x {accumulation} accumulation, {len(trainer.train_dataset)} packed rows, "
                  f"{'bf16 autocast' if args.bf16 else 'fp32'}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
                  f"padding-free {trainer.padding_free}, optim {getattr(args.optim, 'value', args.optim)}, "
                  f"SFTTrainer() {setup:.0f} s (tokenize + pack + model load)",
    }


SIDES = {"ours": side_ours, "trainer": side_trainer, "trl": side_trl}


def child(args) -> None:
    spec = json.loads(Path(args.spec).read_text())
    result = SIDES[args.side](spec)
    print(json.dumps(result))


def run_side(name: str, spec: dict, work: Path, verbose: bool) -> dict:
    """Run one side in a fresh interpreter (its output to work/<side>.log); it prints its result as JSON last."""
    spec_file = work / f"spec-{name}.json"
    spec_file.write_text(json.dumps(spec))
    log = work / f"{name}.log"
    env = dict(os.environ, **OFFLINE_ENV)
    cmd = [sys.executable, __file__, "--side", name, "--spec", str(spec_file)]
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out_lines = []
        import threading

        def relay():
            for line in proc.stderr:
                err.write(line)
                err.flush()
                if verbose:
                    sys.stderr.write(f"  [{name}] {line}")

        t = threading.Thread(target=relay, daemon=True)
        t.start()
        out_lines = proc.stdout.read().splitlines()
        proc.wait()
        t.join()
    e2e = time.perf_counter() - start
    if proc.returncode != 0 or not out_lines:
        tail = log.read_text().splitlines()[-40:]
        sys.exit(f"side {name} failed (exit {proc.returncode}); the end of {log}:\n" + "\n".join(tail))
    result = json.loads(out_lines[-1])
    result["e2e_s"] = e2e
    result["tok_s"] = result["tokens"] / result["loop_s"]
    return result


def table(name: str, r: dict, load: float) -> str:
    head = f"{'':>8}  {'steps':>5}  {'tokens':>9}  {'loop s':>8}  {'tokens/s':>9}  {'e2e s':>7}  {'peak RSS MB':>11}  {'loss first':>10}  {'loss last':>9}"
    row = (f"{name:>8}  {r['steps']:>5}  {r['tokens']:>9,}  {r['loop_s']:>8.1f}  {r['tok_s']:>9,.0f}  {r['e2e_s']:>7.1f}  "
           f"{r['peak_rss_mb']:>11,}  {r['loss_first']:>10.4f}  {r['loss_last']:>9.4f}")
    return f"{head}\n{row}\n{'':>10}{r['detail']} (load average before: {load:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a real model (catalog name or directory): ours against TRL's SFTTrainer")
    ap.add_argument("--steps", type=int, help="cap both sides at this many optimizer steps (default: one epoch)")
    ap.add_argument("--data", type=Path, help="chat JSONL (default: bench/chat_data.py's conversations)")
    ap.add_argument("--conversations", type=int, default=CONVERSATIONS, help="generated conversations (default 175)")
    ap.add_argument("--context-length", type=int, help=f"default {TINY_CONTEXT} (tiny model), {REAL_CONTEXT} (--model)")
    ap.add_argument("--learning-rate", type=float, help=f"peak, both sides (default {TINY_LR} tiny, {REAL_LR} --model)")
    ap.add_argument("--training-config", default="{}", help="JSON of extra tessera training_config settings for ours")
    ap.add_argument("--sides", default="ours,peer", help="ours,peer (default), or one of them")
    ap.add_argument("--peer-split", choices=["user", "ours"], default="user",
                    help="the peer's per-device batch x accumulation for our global batch: user (default): its default "
                         "per-device batch of 8 rows, or the largest divisor of our rows per step below it; ours: our "
                         "memory plan's micro-batch")
    ap.add_argument("--repeat", type=int, default=1, help="run the sides this many times, alternating; each side's fastest counts")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-train",
                    help="keeps the data, the tiny model, the prepared rows and each side's log between runs")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every side (default: torch's, one per core); "
                    "1 keeps a busy shared machine from stalling each op at a thread barrier")
    ap.add_argument("--verbose", action="store_true", help="show each side's output as it runs")
    ap.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child(args)

    t0 = time.perf_counter()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if "TESSERA_WHEEL_CACHE" not in os.environ:  # the user's fetched SmolLM2 wheel, before TESSERA_HOME moves
        from tessera.core.smollm2 import wheel_cache

        os.environ["TESSERA_WHEEL_CACHE"] = str(wheel_cache())
    if args.threads:  # inherited by every side, and by torchrun's worker
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ["TESSERA_HOME"] = str(work / "home")  # prepared rows, MLflow store, run records: the bench's own
    os.environ.update(OFFLINE_ENV)
    from tessera.core.paths import apply_engine_defaults

    apply_engine_defaults()

    real = args.model is not None
    context = args.context_length or (REAL_CONTEXT if real else TINY_CONTEXT)
    data = args.data.resolve() if args.data else work / f"chat-{args.conversations}.jsonl"
    if not args.data:
        from bench.chat_data import write_chat_data

        write_chat_data(data, args.conversations)  # deterministic: the same file every time
    if real:
        from tessera.core.catalog import resolve_model

        if Path(args.model).is_dir():
            model_name = model_dir = str(plain_model_dir(Path(args.model).resolve(), work))
        else:
            model_name, model_dir = args.model, resolve_model(args.model, context).path
    else:
        digest = hashlib.sha256(data.read_bytes()).hexdigest()[:12]  # the tokenizer is trained on the data
        model_dir = str(build_tiny_model(data, work / f"tiny-llama-{VOCAB_SIZE}-{context}-{digest}", context))
        model_name = model_dir

    conversations, tokens, longest = count_tokens(data, model_dir)
    print(f"data {data}: {conversations} conversations, {tokens:,} tokens with {Path(model_dir).name}'s tokenizer and "
          f"chat template (longest {longest:,})", flush=True)

    spec = {
        "model": model_name, "model_dir": model_dir, "data": str(data), "context_length": context, "steps": args.steps,
        "learning_rate": args.learning_rate or (REAL_LR if real else TINY_LR),
        "training_config": {**({} if real else {"global_batch_tokens": TINY_BATCH_ROWS * context}),
                            **json.loads(args.training_config)},
        "work": str(work), "seed": 0, "peer_split": args.peer_split,
    }
    from transformers import AutoTokenizer

    from tasks.prepare.stage import prepare

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec["pad_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prepared = prepare(run_config(spec))  # untimed, shared: ours reuses it, the Trainer side reads its rows
    st = prepared.stats
    spec["prepared_path"], spec["seed"] = prepared.path, 0
    print(f"prepared {st.examples} examples into {st.rows} rows of {st.context_length} (fill {st.fill:.3f}, "
          f"{st.tokens:,} tokens, {st.trainable_tokens:,} trained, {st.truncated} truncated); {os.cpu_count()} cores, "
          f"{'--steps ' + str(args.steps) if args.steps else 'one epoch'}", flush=True)

    peer = "trl" if real else "trainer"
    sides = [s.replace("peer", peer) for s in args.sides.split(",")]
    spec["ours"] = planned(spec, prepared)  # the stage's own plan_run: what the peer copies (batch, steps, rate)
    results = {}
    for name in sides * args.repeat:  # alternating, so a busy spell on the machine does not hit one side only
        load = os.getloadavg()[0]  # other work on the machine skews a side: shown so a reader can tell
        r = run_side(name, spec, work, args.verbose)
        print(table(name, r, load), flush=True)
        if name not in results or r["tok_s"] > results[name]["tok_s"]:  # with --repeat, a side's fastest run counts
            results[name] = r
        if name == "ours":
            keys = ("steps", "rows_per_step", "micro_rows", "learning_rate", "precision")
            if any(r[k] != spec["ours"][k] for k in keys):  # e.g. less free RAM in the worker: its plan counts
                print(f"  (the worker's plan differs from the bench's: {({k: r[k] for k in keys})}; the peer copies the worker's)")
                spec["ours"] = {**spec["ours"], **{k: r[k] for k in keys}}

    print(f"({time.perf_counter() - t0:.0f} s in all; each side's output in {work}/<side>.log)")
    ours = results.get("ours", {})
    ratio = f"{ours['tok_s'] / results[peer]['tok_s']:.2f}" if ours and peer in results else "n/a"
    if real:
        print(f"train ours/trl={ratio} peak_rss_mb={ours.get('peak_rss_mb', 'n/a')} "
              f"trl_peak_rss_mb={results.get('trl', {}).get('peak_rss_mb', 'n/a')}")
    else:
        print(f"train ours/trainer={ratio} peak_rss_mb={ours.get('peak_rss_mb', 'n/a')}")


if __name__ == "__main__":
    main()
