"""The GPU check: the trainer's and the server's GPU paths, in one process, one line each. Not a test: CI has no GPU.

Run it whenever a GPU machine is lent (no network there; torch and transformers but no pydantic, MLflow, Prefect,
BentoML or datasets; 64 MiB may travel with the command):

    make gpu-wheels                      # here: pydantic's cp312 manylinux wheels into .gpu-wheels (about 3 MB)
    python bench/gpu_check.py            # there, with .gpu-wheels carried beside the working tree

It prints a line for each of:
  train    10 optimizer steps through the worker's own step (tasks/train/worker.py: train_step) with the trainer's
           attention kernel for this device (tessera.core.run_plan.resolve_attention), bf16 autocast over fp32 master
           weights, in a process group made by the trainer's own function (NCCL on a GPU), with the logging window's
           collective; SmolLM2-135M's architecture with random weights (the real ones are too big to carry), the same
           packed batch each step, so the loss must fall
  packed   the packed-isolation check on each attention kernel the trainer may use on this device (sdpa, and on
           a GPU flex_attention, the trainer's default there): each packed example's per-token losses equal those
           of the example alone
  memory   the memory plan's estimate (tessera/core/memory.py, runtime overhead left out) against
           torch.cuda.max_memory_allocated of the steps above
  serve    a generation through the serving stage's batching engine (tasks/serve/engine.py), in-process
  mfu      (with --mfu) tokens/s, MFU and peak memory of the same step on a ~1.2B Llama (Llama-3.2-1B's shape,
           random weights), 4 packed rows of 2048 tokens, bf16: MFU = (6 x parameters + 12 x layers x hidden x
           sequence) x tokens/s / the GPU's dense bf16 peak (989 TFLOP/s for H100 and H200 SXM)

`--device cpu` runs the same on a CPU, shorter, to check the script itself before spending device time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu-wheels"

# SmolLM2-135M-Instruct's config.json, shape only (134.5M parameters)
SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def use_carried_wheels() -> None:
    """Import pydantic from the carried wheels when this Python lacks it. Before torch is imported: the wheels'
    typing_extensions must be the one every module sees."""
    try:
        import pydantic  # noqa: F401

        return
    except ImportError:
        pass
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        sys.exit(f"pydantic is not installed and {WHEELS} has no wheels: run `make gpu-wheels` and carry .gpu-wheels")
    target = Path(tempfile.mkdtemp(prefix="tessera-gpu-wheels-"))
    for wheel in wheels:
        zipfile.ZipFile(wheel).extractall(target)
    sys.path.insert(0, str(target))


def report(name: str, ok: bool, text: str) -> bool:
    print(f"{name:<7} {'ok  ' if ok else 'FAIL'} {text}", flush=True)
    return ok


def packed_batch(rows: int, context: int, examples: int, vocab: int, device):
    """Rows of `examples` packed examples each (positions restarting at 0), every token trained but each
    example's first: what the trainer's data loader hands the step."""
    import torch

    from tessera.core.training import IGNORE_INDEX

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, context), generator=generator)
    pos = torch.arange(context).remainder(context // examples).expand(rows, -1).contiguous()
    labels = ids.masked_fill(pos == 0, IGNORE_INDEX)
    return ids.to(device), labels.to(device), pos.to(device)


def check_train(model, device, rows: int, context: int, steps: int) -> tuple[bool, float]:
    """(passed, seconds per step) of `steps` optimizer steps through the worker's step."""
    import torch

    from tasks.train import distributed
    from tasks.train.data import Step
    from tasks.train.parallel import Parallelism
    from tasks.train.precision import autocast, compute_dtype
    from tasks.train.worker import train_step
    from tessera.core.training import IGNORE_INDEX

    dtype = compute_dtype("bf16", device)
    parallel = Parallelism("ddp", 1, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    batch = packed_batch(rows, context, 4, model.config.vocab_size, device)
    trained = int((batch[1][:, 1:] != IGNORE_INDEX).sum())
    losses, start = [], time.perf_counter()
    for index in range(steps):
        step = Step(index, [batch], trained, rows * context, rows * context)
        loss, _ = train_step(model, params, optimizer, step, 1e-3, dtype, parallel, max_grad_norm=1.0)
        window_loss, _ = distributed.sum_over_ranks([loss, rows * context], device).tolist()  # NCCL on a GPU
        losses.append(window_loss / trained)
        if index == 0:
            start = time.perf_counter()  # the first step warms up kernels and the allocator
    seconds = (time.perf_counter() - start) / max(1, steps - 1)
    master_fp32 = all(p.dtype == torch.float32 for p in params)
    with autocast(dtype, device):
        computes_in = model.model.layers[0].mlp.down_proj(torch.zeros(1, model.config.intermediate_size, device=device)).dtype
    ok = losses[-1] < losses[0] and master_fp32 and computes_in == dtype
    tokens_per_s = rows * context / seconds
    flops = 6 * sum(p.numel() for p in params) * tokens_per_s
    report("train", ok, f"{steps} steps of {rows}x{context} tokens, bf16 autocast over fp32 master weights "
                        f"(master fp32: {master_fp32}, matmuls in {str(computes_in).removeprefix('torch.')}): loss "
                        f"{losses[0]:.4f} -> {losses[-1]:.4f}, {seconds * 1000:.0f} ms/step, {tokens_per_s:,.0f} tok/s, "
                        f"~{flops / 1e12:.1f} TFLOP/s (6 x params x tokens)")
    optimizer.state.clear()
    return ok, seconds


# A Llama-architecture model of ~1.2B parameters (Llama-3.2-1B's shape), random weights: the MFU measurement's model
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM: the spec sheets' figure


def check_mfu(device, cuda: bool, attention: str) -> bool:
    """Tokens/s, MFU and peak memory of the trainer's own step on a ~1B Llama, sequence 2048, bf16, packed rows.
    MFU = (6 x parameters + 12 x layers x hidden x sequence) x tokens/s / the GPU's dense bf16 peak."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LLAMA_1B if cuda else {**SMOLLM2_135M, "num_hidden_layers": 2}
    rows, context = (4, 2048) if cuda else (1, 256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation=attention)).to(device).train()
    model.config.use_cache = False
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _, seconds = check_train(model, device, rows, context, 10 if cuda else 3)
    parameters = sum(p.numel() for p in model.parameters())
    tokens_per_s = rows * context / seconds
    flops_per_token = 6 * parameters + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * context
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    mfu = f"{flops_per_token * tokens_per_s / peak:.1%}" if peak else "n/a (no peak figure for this device)"
    memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
    report("mfu", True, f"{parameters / 1e9:.2f}B parameters, {rows}x{context} tokens a step, {attention}: {tokens_per_s:,.0f} tok/s, "
                        f"MFU {mfu} ((6 x params + 12 x layers x hidden x seq) x tok/s / dense bf16 peak){memory}")
    return True


def check_packed(model, device, context: int) -> bool:
    """Each example of a packed row has, token for token, the loss it has alone (bf16 autocast, as trained)."""
    import torch
    import torch.nn.functional as F

    from tasks.train.precision import autocast, compute_dtype
    from tessera.core.training import IGNORE_INDEX

    examples = 4
    ids, labels, pos = packed_batch(1, context, examples, model.config.vocab_size, device)

    def token_losses(i, l, p):
        logits = model(input_ids=i, position_ids=p, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), l[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")

    model.eval()
    with torch.no_grad(), autocast(compute_dtype("bf16", device), device):
        packed = token_losses(ids, labels, pos)
        width = context // examples
        worst = 0.0
        for k in range(examples):
            a, b = k * width, (k + 1) * width
            alone = token_losses(ids[:, a:b], labels[:, a:b], pos[:, a:b])
            worst = max(worst, float((packed[:, a:b - 1] - alone).abs().max()))
        leaked = token_losses(ids, labels, torch.arange(context, device=device)[None])  # one long example: must differ
        leak = float((leaked[:, width:] - packed[:, width:]).abs().max())
    model.train()
    attention = model.config._attn_implementation
    return report("packed", worst < 0.05 < leak, f"{examples} examples of {width} tokens in one row ({attention} attention, "
                                                 f"bf16): largest per-token loss difference from each example alone "
                                                 f"{worst:.4f} (bound 0.05); without restarting positions {leak:.2f}")


def check_memory(model_config: dict, device, rows: int, context: int, attention: str) -> bool:
    import torch

    from tessera.core.memory import RUNTIME_BYTES, Architecture, estimate

    if device.type != "cuda":
        return report("memory", True, "skipped: torch.cuda.max_memory_allocated needs a GPU")
    arch = Architecture.from_config(model_config)
    planned = estimate(arch, "cuda", context, rows, precision="bf16", activation_checkpointing=False,
                       dense_mask=attention != "flex_attention")
    planned_bytes = planned.total - RUNTIME_BYTES["cuda"]  # the CUDA context and workspaces: not allocated tensors
    measured = torch.cuda.max_memory_allocated(device)
    ratio = planned_bytes / measured
    return report("memory", 0.75 <= ratio <= 1.5, f"plan {planned_bytes / 1e9:.2f} GB (runtime overhead left out) vs "
                                                   f"max_memory_allocated {measured / 1e9:.2f} GB: plan/measured {ratio:.2f}")


def check_serve(model_dir: Path, device) -> bool:
    """One greedy request through the batching engine, as the endpoint drives it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.serve.engine import Sampling, engine_for
    from tessera.core.generation import prompt_ids
    from tasks.serve.settings import ServeSettings

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.to(device).eval()
    engine = engine_for(model, tokenizer, ServeSettings())
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "What is Tessera?"}])

    async def one() -> tuple[str, str | None, int, float]:
        loop = asyncio.get_running_loop()
        text, reason, tokens, start = "", None, 0, time.perf_counter()
        async for delta in engine.generate(ids, Sampling(max_tokens=32, temperature=0.0, top_p=1.0, stop=[]), loop.time() + 120):
            text, reason, tokens = text + delta.text, delta.finish_reason, delta.completion_tokens
        return text, reason, tokens, time.perf_counter() - start

    try:
        text, reason, tokens, seconds = asyncio.run(one())
    finally:
        engine.close()
    return report("serve", tokens > 0 and reason in ("stop", "length"),
                  f"{type(engine).__name__} on {device.type}: {tokens} tokens in {seconds:.2f} s, finish_reason {reason}, "
                  f"text {text[:40]!r} (random weights: any text)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--mfu", action="store_true", help="also: tokens/s and MFU of the step on a ~1B Llama (random init)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    use_carried_wheels()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.train import distributed
    from tessera.core.run_plan import resolve_attention
    from tessera.core.tiny_model import build_tiny_chat

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU here: run with --device cpu to check the script itself", file=sys.stderr)
        return 1
    cuda = args.device == "cuda"
    rows, context, steps = (8, 2048, 10) if cuda else (1, 256, 3)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29517"), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    device = distributed.training_device() if cuda else torch.device("cpu")
    distributed.init(device)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"device  {name}; torch {torch.__version__}; backend {torch.distributed.get_backend()}", flush=True)

    attention = resolve_attention("auto", device.type)[0]  # what the trainer uses on this device
    results = []
    for kernel in dict.fromkeys(["sdpa", attention]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, attn_implementation=kernel)).to(device)
        results.append(check_packed(model, device, 512))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, attn_implementation=attention)).to(device).train()
    model.config.use_cache = False
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ok, _ = check_train(model, device, rows, context, steps)
    results += [ok, check_memory(SMOLLM2_135M, device, rows, context, attention)]
    del model
    if args.mfu:
        results.append(check_mfu(device, cuda, attention))
    with tempfile.TemporaryDirectory() as tmp:
        results.append(check_serve(build_tiny_chat(Path(tmp) / "tiny-chat"), device))
    torch.distributed.destroy_process_group()
    print(f"gpu_check {'passed' if all(results) else 'FAILED'}: {sum(results)}/{len(results)}", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
