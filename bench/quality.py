"""Model-quality benchmark: what one epoch of fine-tuning does to SmolLM2-135M-Instruct on held-out conversations,
our trainer (the train stage itself) side by side with TRL's SFTTrainer, and how long each took.

    python bench/quality.py                                   # base, trl, ours (~25 min: TRL ~14, ours ~4, measures)
    python bench/quality.py --reuse --sides base,trl,ours     # base and TRL from an earlier run: only ours trains
    python bench/quality.py --reuse --learning-rate 3e-5 --training-config '{"warmup_ratio": 0.05}'
    python bench/quality.py --model /path/to/model-dir        # another base model (default: the catalog's SmolLM2)

The data is bench/quality_data.py's: the questions and answers of the FAQ files Debian documentation packages ship
(lsof, sed, valgrind, zlib, xz-utils, base-files, procps), one conversation each, every 8th held out: train.jsonl
and eval.jsonl in --work. Both trainers get train.jsonl and one epoch at a context of 1,024 tokens.

The sides (each trainer in a fresh process, so its peak RSS is its own):
  base  the model untouched: measures only.
  trl   TRL's SFTTrainer as a user would pick it: its defaults (learning rate 2e-5, 8 rows per device, no
        accumulation, loss on every token: system prompt, question, markup and answer; bf16 autocast and gradient
        checkpointing) plus use_cpu=True, packing=True, max_length=1024, num_train_epochs=1 (its default is 3);
        logging_steps=1, save_strategy="no" and report_to="none" change nothing it trains. Its model is saved to
        --work/trl-model for the measures.
  ours  the product's train stage as bench/train.py runs it (prepare, data report, tasks.train.stage.train_model:
        plan_run, MLflow in the bench's own TESSERA_HOME, the training worker), with the run's defaults: the model
        catalog's learning rate, the memory plan's batch, loss on the assistant turns only. --learning-rate,
        --training-config (TrainingSettings as JSON: global_batch_tokens, micro_batch_tokens, warmup_ratio, ...)
        and --training-duration make a variant without code changes. Its fine-tuned model (the run's final_model,
        stored in the base model's dtype) is measured, then deleted.

The measures, all on eval.jsonl with plain transformers in fp32 (use_cache off for the loss):
  loss        mean negative log-likelihood per assistant token (the answer's tokens and the template's end-of-turn
              token <|im_end|>), over every held-out conversation; loss_drop = (base - tuned) / base
  eot         the probability of <|im_end|> right after each reference answer (mean): does the model know to stop
  stops       greedy generation (a fresh GenerationConfig: no sampling, nothing from the model's own config) for the
              first --generate held-out prompts (system + question), --max-new-tokens new tokens each, in one
              left-padded batch: how many ended their turn with <|im_end|> within the budget
  repetition  the share of an answer's 4-grams (of token ids, <|im_end|> excluded) that repeat an earlier one of the
              same answer (mean over the generated answers): 0 for prose, near 1 for a loop
  loop s      wall time of the training loop (trl: on_train_begin to its last step; ours: the worker's
              train_runtime_s); e2e s: the training side's work after its imports (trl: reading the data,
              tokenizing and packing, model load, loop, saving; ours: prepare, planning, MLflow, the worker's start,
              model load, loop, saving)
  peak RSS    ru_maxrss of the process that trains (trl: its process; ours: the worker)
Each side's generated answers are written to --work/answers-<side>.jsonl for reading.

--reuse keeps finished sides: each side's numbers are saved to --work/results/<side>-<fingerprint>.json (the
fingerprint covers the data, the model, the measures' settings and the side's own settings), and a side whose
file exists is not run again. TRL takes ~14 minutes here; ours ~4.

One line per side, then the summary:
`quality ours/trl loss_drop=<our drop / TRL's> eot=<our eot / TRL's> stops=<ours>/<n> trl_stops=<TRL's>/<n>
speedup=<TRL loop s / ours>`, followed by the base model's stops, both repetitions and the e2e speedup.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train import OFFLINE_ENV, REAL_CONTEXT, Clock, count_tokens, plain_model_dir, rss_mb  # noqa: E402
from tasks.train.evaluation import repeated_share  # noqa: E402  the trainer's stop check measures the same way

DEFAULT_MODEL = "tessera/smollm2-135m-instruct"
GENERATE = 12
MAX_NEW_TOKENS = 400


# --- the trainers, each in its own process ------------------------------------------------------------------


def side_trl(spec: dict) -> dict:
    """TRL's SFTTrainer with its defaults plus use_cpu, packing, max_length and one epoch; saves its model."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    conversations = datasets.load_dataset("json", data_files=spec["data"], split="train",
                                          cache_dir=spec["work"] + "/hf-cache")
    clock = Clock()
    args = SFTConfig(
        output_dir=spec["work"] + "/trl-out", use_cpu=True, packing=True, max_length=spec["context_length"],
        num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none", seed=0,
    )
    trainer = SFTTrainer(model=spec["model_dir"], args=args, train_dataset=conversations, callbacks=[clock])
    result = trainer.train()
    peak = rss_mb()  # before saving: the training's own peak
    trainer.save_model(spec["model_out"])
    return {
        "steps": result.global_step, "loop_s": clock.end - clock.start, "e2e_s": time.perf_counter() - start,
        "peak_rss_mb": peak, "loss_first": clock.losses[0], "loss_last": clock.losses[-1], "model_dir": spec["model_out"],
        "detail": f"lr {args.learning_rate:g}, {args.per_device_train_batch_size} rows x {args.gradient_accumulation_steps} "
                  f"accumulation, {len(trainer.train_dataset)} packed rows, "
                  f"{'bf16 autocast' if args.bf16 else 'fp32'} over {next(trainer.model.parameters()).dtype} weights, "
                  f"warmup {getattr(args, 'warmup_ratio', None) or args.warmup_steps}, {args.lr_scheduler_type} schedule, "
                  f"loss on {'assistant tokens' if getattr(args, 'assistant_only_loss', False) else 'every token'}",
    }


def side_ours(spec: dict) -> dict:
    """The train stage as the flow calls it (and as bench/train.py runs it), keeping the fine-tuned model."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")  # the worker's lines, to the log
    from tessera.core.paths import apply_engine_defaults

    apply_engine_defaults()
    from mlflow import MlflowClient

    from tasks.prepare.stage import prepare
    from tasks.train.stage import train_model
    from tasks.validate import data_report
    from tessera.core import runs
    from tessera.core.config import build_run_config
    from tessera.core.paths import mlflow_tracking_uri
    from tessera.core.run_plan import resolve_run
    from tessera.core.training import TrainJob

    start = time.perf_counter()
    config = build_run_config(
        model=spec["model"], train_data_path=spec["data"], register_to="bench.quality.m",
        context_length=spec["context_length"], learning_rate=spec["learning_rate"],
        training_duration=spec["training_duration"], training_config=spec["training_config"] or None,
    )
    runs.save(runs.RunRecord(config=config, created_at=runs.now()))
    run = resolve_run(config)
    prepared = prepare(config)
    trained = train_model.fn(run, prepared, data_report(run, prepared))
    e2e = time.perf_counter() - start
    job = TrainJob.model_validate_json(runs.job_file(config.name).read_text())
    client = MlflowClient(mlflow_tracking_uri())

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(trained.mlflow_run_id, key), key=lambda m: (m.step, m.timestamp))]

    loss, s = history("loss"), job.settings
    return {
        "steps": job.plan.total_steps, "loop_s": history("train_runtime_s")[-1], "e2e_s": e2e,
        "peak_rss_mb": round(max(history("peak_rss_mb"))), "loss_first": loss[0], "loss_last": loss[-1],
        "model_dir": trained.model_dir,
        "detail": f"lr {job.learning_rate:g}, {job.plan.rows_per_step} rows of {prepared.stats.context_length} per step "
                  f"in micro-batches of {min(job.micro_rows, job.plan.rows_per_step)}, {job.plan.rows} packed rows, "
                  f"{s.precision}{' autocast over fp32 weights' if s.precision == 'bf16' else ''}, warmup {s.warmup_ratio}, "
                  f"linear decay, loss on assistant tokens, training_config {json.dumps(spec['training_config'])}",
    }


TRAINERS = {"trl": side_trl, "ours": side_ours}


def run_trainer(name: str, spec: dict, work: Path) -> dict:
    """One trainer in a fresh interpreter (its output to work/<name>.log); it prints its result as JSON last."""
    spec_file = work / f"spec-{name}.json"
    spec_file.write_text(json.dumps(spec))
    log = work / f"{name}.log"
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, __file__, "--side", name, "--spec", str(spec_file)], cwd=REPO,
                              env=dict(os.environ, **OFFLINE_ENV), stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = log.read_text().splitlines()[-40:]
        sys.exit(f"side {name} failed (exit {proc.returncode}); the end of {log}:\n" + "\n".join(tail))
    return json.loads(proc.stdout.splitlines()[-1])


# --- the measures -------------------------------------------------------------------------------------------


def measure(model_dir: str, tokenizer_dir: str, eval_data: Path, generate: int, max_new_tokens: int, answers: Path) -> dict:
    """Held-out assistant loss, end-of-turn probability, and greedy stops and repetition, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # the base model's for every side: one tokenization
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chats = [json.loads(line)["messages"] for line in eval_data.read_text().splitlines()]

    nll, tokens, eot_probs = 0.0, 0, []
    with torch.no_grad():
        for messages in chats:
            prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
            full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            assert full[:len(prompt)] == prompt, "the chat template renders the prompt differently with the answer"
            end = full.index(eot, len(prompt))  # the answer's end-of-turn token: trained, and scored
            ids = torch.tensor([full[:end + 1]])
            logprobs = torch.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            picked = logprobs[torch.arange(len(targets)), targets][len(prompt) - 1:]  # predictions of answer + eot
            nll -= picked.sum().item()
            tokens += len(picked)
            eot_probs.append(picked[-1].exp().item())

        tokenizer.padding_side = "left"
        prompts = [tokenizer.apply_chat_template(m[:-1], add_generation_prompt=True, tokenize=False) for m in chats[:generate]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot,
                                  pad_token_id=tokenizer.pad_token_id)
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             generation_config=greedy)[:, batch["input_ids"].shape[1]:].tolist()
    stops, repetition, lengths = 0, [], []
    with open(answers, "w") as f:
        for messages, ids in zip(chats, out):
            stopped = eot in ids
            ids = ids[:ids.index(eot)] if stopped else ids
            stops += stopped
            repetition.append(repeated_share(ids))
            lengths.append(len(ids))
            f.write(json.dumps({"question": messages[1]["content"], "stopped": stopped, "tokens": len(ids),
                                "answer": tokenizer.decode(ids), "reference": messages[2]["content"]}) + "\n")
    del model
    gc.collect()
    stored = json.loads((Path(model_dir) / "config.json").read_text()).get("dtype")  # bf16 storage rounds small updates
    return {"stored_dtype": stored, "loss": nll / tokens, "eot": sum(eot_probs) / len(eot_probs), "stops": stops, "generated": len(out),
            "repetition": sum(repetition) / len(repetition), "answer_tokens": sum(lengths) / len(lengths)}


# --- the bench ----------------------------------------------------------------------------------------------


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def side_line(name: str, r: dict, base_loss: float) -> str:
    m = r["measures"]
    drop = (base_loss - m["loss"]) / base_loss
    text = (f"{name:<6} loss={m['loss']:.4f} loss_drop={drop:+.3f} eot={m['eot']:.3f} stops={m['stops']}/{m['generated']} "
            f"repetition={m['repetition']:.3f} answer_tokens={m['answer_tokens']:.0f} stored={m['stored_dtype']} "
            f"load_before={r['load_before']:.1f}")
    if "train" in r:
        t = r["train"]
        text += (f" loop_s={t['loop_s']:.0f} e2e_s={t['e2e_s']:.0f} peak_rss_mb={t['peak_rss_mb']:,} steps={t['steps']} "
                 f"train_loss={t['loss_first']:.3f}->{t['loss_last']:.3f}\n{'':8}{t['detail']}")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"catalog name or model directory (default {DEFAULT_MODEL})")
    ap.add_argument("--sides", default="base,trl,ours", help="any of base,trl,ours (default: all three)")
    ap.add_argument("--learning-rate", type=float, help="ours: peak learning rate (default: the run's, the catalog's)")
    ap.add_argument("--training-config", default="{}", help="ours: JSON of tessera training_config settings")
    ap.add_argument("--training-duration", help="ours: e.g. 2ep (default: the run's, one epoch)")
    ap.add_argument("--generate", type=int, default=GENERATE, help=f"held-out prompts to answer greedily (default {GENERATE})")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help=f"each answer's budget (default {MAX_NEW_TOKENS})")
    ap.add_argument("--reuse", action="store_true", help="keep the numbers of sides already run with the same settings")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-quality",
                    help="keeps the data, TRL's model, each side's numbers, log and answers between runs")
    ap.add_argument("--side", choices=sorted(TRAINERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(TRAINERS[args.side](json.loads(Path(args.spec).read_text()))))
        return

    t0 = time.perf_counter()
    work = args.work.resolve()
    (work / "results").mkdir(parents=True, exist_ok=True)
    if "TESSERA_WHEEL_CACHE" not in os.environ:  # the user's fetched SmolLM2 wheel, before TESSERA_HOME moves
        from tessera.core.smollm2 import wheel_cache

        os.environ["TESSERA_WHEEL_CACHE"] = str(wheel_cache())
    os.environ["TESSERA_HOME"] = str(work / "home")  # prepared rows, MLflow store, run records: the bench's own
    os.environ.update(OFFLINE_ENV)
    from tessera.core.paths import apply_engine_defaults

    apply_engine_defaults()
    from bench.quality_data import write_quality_data

    train_data, eval_data = write_quality_data(work / "data")  # deterministic: the same files every time
    catalog_lr = None  # the rate ours trains at when --learning-rate is not given: part of its results' fingerprint
    if Path(args.model).is_dir():
        model_name = model_dir = str(plain_model_dir(Path(args.model).resolve(), work))
    else:
        from tessera.core.catalog import resolve_model

        resolved = resolve_model(args.model, REAL_CONTEXT)
        model_name, model_dir, catalog_lr = args.model, str(resolved.path), resolved.learning_rate
    for path in (train_data, eval_data):
        n, tokens, longest = count_tokens(path, model_dir)
        print(f"{path.name}: {n} conversations, {tokens:,} tokens with the chat template (longest {longest:,})", flush=True)

    common = [hashlib.sha256(train_data.read_bytes() + eval_data.read_bytes()).hexdigest(), model_name,
              REAL_CONTEXT, args.generate, args.max_new_tokens]
    training_config = json.loads(args.training_config)
    ours_settings = {"learning_rate": args.learning_rate, "training_config": training_config}
    if args.training_duration:  # only when set, so that earlier results' fingerprints still match
        ours_settings["training_duration"] = args.training_duration
    spec = {"model": model_name, "model_dir": model_dir, "data": str(train_data), "context_length": REAL_CONTEXT,
            "work": str(work), "model_out": str(work / "trl-model"), "training_duration": None, **ours_settings}
    sides = args.sides.split(",")
    results = {}
    for name in ["base"] + [s for s in ("trl", "ours") if s in sides]:  # base always: every loss_drop needs it
        settings = ours_settings if name == "ours" else {}
        # a default run's results are stale once the catalog's rate changes
        keyed = {**settings, "catalog_learning_rate": catalog_lr} if name == "ours" and args.learning_rate is None else settings
        cached = work / "results" / f"{name}-{fingerprint(*common, keyed)}.json"
        if args.reuse and cached.exists():
            results[name] = json.loads(cached.read_text())
            print(f"{name}: reusing {cached}", flush=True)
            continue
        load = os.getloadavg()[0]  # other work on the machine slows a trainer: shown so a reader can tell
        r = {"settings": settings, "load_before": load}
        if name == "base":
            measured_dir = model_dir
        else:
            r["train"] = run_trainer(name, spec, work)
            measured_dir = r["train"]["model_dir"]
        r["measures"] = measure(measured_dir, model_dir, eval_data, args.generate, args.max_new_tokens,
                                work / f"answers-{name}.jsonl")
        if name == "ours":  # 0.5 GB per variant; its numbers are kept
            shutil.rmtree(measured_dir, ignore_errors=True)
        cached.write_text(json.dumps(r, indent=2))
        results[name] = r
        print(f"{name}: done (load average before: {load:.1f})", flush=True)

    base_loss = results["base"]["measures"]["loss"]
    for name, r in results.items():
        if name in sides:
            print(side_line(name, r, base_loss), flush=True)
    print(f"({time.perf_counter() - t0:.0f} s in all; logs, answers and numbers in {work})")
    if "ours" in results and "trl" in results:
        ours, trl, base = (results[k]["measures"] for k in ("ours", "trl", "base"))
        drop = {k: (base_loss - results[k]["measures"]["loss"]) / base_loss for k in ("ours", "trl")}
        speed = {k: results["trl"]["train"][k] / results["ours"]["train"][k] for k in ("loop_s", "e2e_s")}
        print(f"quality ours/trl loss_drop={drop['ours'] / drop['trl']:.2f} eot={ours['eot'] / trl['eot']:.2f} "
              f"stops={ours['stops']}/{ours['generated']} trl_stops={trl['stops']}/{trl['generated']} "
              f"speedup={speed['loop_s']:.1f} base_stops={base['stops']}/{base['generated']} "
              f"repetition={ours['repetition']:.3f}/{trl['repetition']:.3f} e2e_speedup={speed['e2e_s']:.1f} "
              f"settings={json.dumps(ours_settings)}")


if __name__ == "__main__":
    main()
