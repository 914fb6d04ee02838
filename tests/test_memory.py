"""The memory model (tessera/core/memory.py): its arithmetic, its choices, its refusals, and (slow) its estimate
against the peak RSS of real training steps of a real pretrained model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.core.errors import ConfigError
from tessera.core.memory import GB, Architecture, Hardware, estimate, plan_memory

ROOT = Path(__file__).resolve().parents[1]

LLAMA_31_8B = Architecture(
    hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256,
)
SMOLLM2_135M = Architecture(
    hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, head_dim=64, tie_word_embeddings=True,
)
ONE_80GB_GPU = Hardware(device="cuda", count=1, memory_bytes=80 * GB)


def plan(arch=SMOLLM2_135M, hardware=None, context_length=1024, precision="bf16", micro_batch_tokens=None,
         activation_checkpointing=None, nproc=1, parallelism="auto"):
    hardware = hardware or Hardware(device="cpu", count=1, memory_bytes=16 * GB)
    return plan_memory(arch, hardware, context_length, precision=precision, micro_batch_tokens=micro_batch_tokens,
                       activation_checkpointing=activation_checkpointing, nproc=nproc, parallelism=parallelism)


# --- the arithmetic ---------------------------------------------------------------------------------


def test_parameter_counts_and_states():
    assert SMOLLM2_135M.parameters == 134_515_008  # what torch counts for the converted model
    assert LLAMA_31_8B.parameters == 8_030_261_248
    parts = estimate(LLAMA_31_8B, "cuda", 4096, 1, precision="bf16", activation_checkpointing=True).parts
    assert (parts["weights"], parts["gradients"], parts["optimizer"]) == (4 * 8_030_261_248, 4 * 8_030_261_248, 8 * 8_030_261_248)


def test_from_config_reads_gqa_defaults():
    config = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
              "vocab_size": 100, "model_type": "llama"}
    assert Architecture.from_config(config).num_key_value_heads == 4


def test_checkpointing_and_context_scale_activations():
    def act(t, rows, ckpt):
        return estimate(SMOLLM2_135M, "cpu", t, rows, precision="bf16", activation_checkpointing=ckpt).parts["activations"]

    assert act(1024, 3, False) - act(1024, 2, False) == act(1024, 2, False) - act(1024, 1, False)  # linear in rows
    assert act(1024, 1, True) < act(1024, 1, False) / 3
    # sdpa's per-layer copy of the block-causal mask (O(T^2) a row): one row of 4096 costs more than 4 of 1024
    assert act(4096, 1, False) > act(1024, 4, False) + 0.5 * GB


def test_flex_attention_counts_no_quadratic_mask_and_is_the_default_on_cuda_only():
    """FlexAttention keeps a block mask, not an L x L one: its activations are linear in the context (sdpa's are not),
    which lets a longer micro-batch fit. auto picks it on CUDA; on a CPU (no FlexAttention backward) sdpa, and
    flex_attention set there is refused."""
    from tessera.core.run_plan import plan_settings, resolve_attention
    from tessera.core.config import TrainingSettings

    def act(t, rows, dense_mask):
        return estimate(LLAMA_31_8B, "cuda", t, rows, precision="bf16", activation_checkpointing=False,
                        dense_mask=dense_mask).parts["activations"]

    def growth(dense_mask):  # what each further 4096 tokens of one row add
        return act(12288, 1, dense_mask) - act(8192, 1, dense_mask), act(8192, 1, dense_mask) - act(4096, 1, dense_mask)

    assert growth(False)[0] == growth(False)[1]  # linear in the context
    assert growth(True)[0] > growth(True)[1] + 2 * GB  # the mask: quadratic
    assert act(8192, 1, True) - act(8192, 1, False) > 4 * GB  # a 2-byte 8192 x 8192 mask in each of 32 layers alone
    assert resolve_attention("auto", "cuda")[0] == "flex_attention" and resolve_attention("auto", "cpu")[0] == "sdpa"
    assert resolve_attention("eager", "cuda") == ("eager", "set by the run")
    with pytest.raises(ConfigError, match="FlexAttention has no backward pass on a CPU; use sdpa"):
        resolve_attention("flex_attention", "cpu")
    eight = Hardware(device="cuda", count=8, memory_bytes=80 * GB)
    planned = {attn: plan_settings(TrainingSettings(attn_implementation=attn), LLAMA_31_8B, eight, 16384, "llama")
               for attn in ("auto", "sdpa")}
    assert planned["auto"][0]["attn_implementation"] == "flex_attention"
    assert planned["auto"][2].total_bytes < planned["sdpa"][2].total_bytes


# --- the chooser ------------------------------------------------------------------------------------


def test_picks_the_largest_micro_batch_without_checkpointing():
    p = plan()  # on CPU at most 2048 tokens: more rows a pass are no faster there
    assert (p.micro_batch_tokens, p.activation_checkpointing) == (2 * 1024, False)
    assert p.total_bytes <= p.budget_bytes
    assert "2 rows of 1024" in p.decided and "without activation checkpointing" in p.decided
    assert "GB" in p.render()
    gpu = plan(hardware=Hardware(device="cuda", count=1, memory_bytes=80 * GB))
    assert (gpu.micro_batch_tokens, gpu.activation_checkpointing) == (8 * 1024, False)


def test_fewer_rows_when_memory_is_short():
    p = plan(hardware=Hardware(device="cpu", count=1, memory_bytes=6 * GB))
    assert 1024 <= p.micro_batch_tokens < 8 * 1024 and not p.activation_checkpointing
    more = estimate(SMOLLM2_135M, "cpu", 1024, p.micro_batch_tokens // 1024 + 1, precision="bf16",
                    activation_checkpointing=False)
    assert more.total > 6 * GB


def test_checkpointing_only_when_one_row_does_not_fit():
    p = plan(context_length=8192, hardware=Hardware(device="cpu", count=1, memory_bytes=8 * GB))
    assert p.activation_checkpointing and p.micro_batch_tokens % 8192 == 0
    assert "checkpointing on" in p.decided


def test_keeps_what_the_run_set():
    p = plan(micro_batch_tokens=3000, activation_checkpointing=True)
    assert (p.micro_batch_tokens, p.activation_checkpointing) == (2048, True)  # rounded down to whole rows
    assert "set by the run" in p.decided
    assert plan(micro_batch_tokens=100).micro_batch_tokens == 1024  # at least one row


def test_cpu_processes_share_the_ram():
    assert plan(nproc=2).budget_bytes == 8 * GB


def test_refuses_a_set_micro_batch_that_does_not_fit_naming_what_would():
    with pytest.raises(ConfigError) as err:
        plan(micro_batch_tokens=8192, activation_checkpointing=False, hardware=Hardware(device="cpu", count=1, memory_bytes=7 * GB))
    message = str(err.value)
    assert message.startswith("does not fit CPU RAM (7.0 GB") and "8 rows of 1024 tokens without activation checkpointing" in message
    assert "micro_batch_tokens 2048 (fewer tokens per micro-batch)" in message
    assert "activation_checkpointing: true" in message


def test_refuses_too_long_a_context_naming_a_shorter_one():
    with pytest.raises(ConfigError, match=r"context_length \d+ \(one row with activation checkpointing\)"):
        plan(context_length=65536, hardware=Hardware(device="cpu", count=1, memory_bytes=8 * GB))


def test_llama_8b_on_one_80gb_gpu_names_the_fewest_gpus_fsdp_fits_and_a_bigger_gpu():
    states = 16 * LLAMA_31_8B.parameters
    assert states > 80 * GB  # 128.5 GB: not even weights, gradients and AdamW fit one GPU
    with pytest.raises(ConfigError) as err:
        plan(LLAMA_31_8B, ONE_80GB_GPU, context_length=4096)
    message = str(err.value)
    assert "with parallelism ddp every GPU keeps all of them" in message
    needed = float(re.search(r"a GPU with at least ([\d.]+) GB of memory", message)[1])
    assert plan(LLAMA_31_8B, Hardware(device="cuda", count=1, memory_bytes=int(needed * GB) + GB), context_length=4096)
    gpus = int(re.search(r"parallelism fsdp over (\d+) GPUs of 80.0 GB", message)[1])
    eight = Hardware(device="cuda", count=8, memory_bytes=80 * GB)
    assert plan(LLAMA_31_8B, eight, context_length=4096, nproc=gpus).parallelism == "fsdp"
    with pytest.raises(ConfigError):
        plan(LLAMA_31_8B, eight, context_length=4096, nproc=gpus - 1)


def test_auto_picks_ddp_when_a_full_copy_fits_else_fsdp_with_sharded_states():
    eight = Hardware(device="cuda", count=8, memory_bytes=80 * GB)
    llama = plan(LLAMA_31_8B, eight, context_length=4096, nproc=8)
    assert llama.parallelism == "fsdp" and "fsdp: a full copy in each process does not fit" in llama.decided
    p = LLAMA_31_8B.parameters
    e = llama.estimate_bytes
    assert (e["weights"], e["gradients"], e["optimizer"]) == (-(-4 * p // 8), -(-4 * p // 8), -(-8 * p // 8))
    # what each GPU gathers: the embeddings and head (untied: two vocabulary x hidden matrices) and two layers, bf16
    assert 2 * 2 * LLAMA_31_8B.vocab_size * 4096 < e["gathered"] < 4 * GB
    assert llama.total_bytes <= 80 * GB
    small = plan(SMOLLM2_135M, eight, context_length=4096, nproc=8)
    assert small.parallelism == "ddp" and "gathered" not in small.estimate_bytes
    assert plan(SMOLLM2_135M, eight, context_length=4096, nproc=8, parallelism="fsdp").parallelism == "fsdp"


def test_llama_70b_on_eight_80gb_gpus_does_not_fit_and_names_the_fewest_that_do():
    from tessera.core.catalog import catalog

    llama_70b = catalog()["meta-llama/Meta-Llama-3.1-70B-Instruct"].architecture
    with pytest.raises(ConfigError) as err:
        plan(llama_70b, Hardware(device="cuda", count=8, memory_bytes=80 * GB), context_length=4096, nproc=8)
    message = str(err.value)
    states = float(re.search(r"AdamW states alone take ([\d.]+) GB", message)[1])
    assert 138 < states < 143 and "sharded over 8 GPUs (fsdp)" in message  # ~141 GB a GPU before activations
    gpus = int(re.search(r"parallelism fsdp over (\d+) GPUs of 80.0 GB", message)[1])
    assert 16 <= gpus <= 32  # the states alone need 15 (1.13 TB); the gathered layers and activations come on top
    eighty = Hardware(device="cuda", count=8, memory_bytes=80 * GB)
    assert plan(llama_70b, eighty, context_length=4096, nproc=gpus).parallelism == "fsdp"
    with pytest.raises(ConfigError):
        plan(llama_70b, eighty, context_length=4096, nproc=gpus - 1)


def test_counts_the_fused_loss_head_gradient_and_no_foreach_copy():
    """The fused loss keeps an fp32 gradient of the head's weight (vocabulary x hidden); fused AdamW makes no
    gradient-sized copy, so one CPU process's peak is not raised to one."""
    parts = estimate(LLAMA_31_8B, "cuda", 4096, 1, precision="bf16", activation_checkpointing=True).parts
    assert parts["loss"] >= 4 * LLAMA_31_8B.vocab_size * LLAMA_31_8B.hidden_size  # 2.1 GB at 128k x 4096
    tiny = Architecture(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=1000)
    one = estimate(tiny, "cpu", 64, 1, precision="fp32", activation_checkpointing=False)
    two = estimate(tiny, "cpu", 64, 1, precision="fp32", activation_checkpointing=False, nproc=2)
    always = sum(one.parts[k] for k in ("weights", "gradients", "optimizer", "runtime"))
    assert one.total == always + one.parts["activations"] + one.parts["loss"]  # no step copy for 1 process
    assert two.total >= always + two.parts["gradients"]  # the flat all-reduce buffer with 2


def test_llama_8b_fits_a_bigger_gpu():
    p = plan(LLAMA_31_8B, Hardware(device="cuda", count=1, memory_bytes=141 * GB), context_length=4096)
    assert p.total_bytes <= 141 * GB


# --- tessera plan ----------------------------------------------------------------------------------


def test_plan_command_says_what_llama_8b_needs_without_importing_torch():
    argv = ["plan", "--model", "meta-llama/Meta-Llama-3.1-8B-Instruct", "--gpus", "1", "--gpu-memory", "80GB"]
    code = f"import sys; from tessera.cli import main; rc = main({argv!r}); assert 'torch' not in sys.modules; sys.exit(rc)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert "8.03B parameters, context 4096 tokens, bf16 compute" in out.stdout
    error = out.stderr.strip()
    assert error.startswith("error: does not fit 1 GPU of 80.0 GB") and "Traceback" not in error
    assert "What would fit: parallelism fsdp over 2 GPUs of 80.0 GB" in error and "a GPU with at least" in error


def test_plan_command_counts_the_gpus_of_every_node(capsys):
    from tessera.cli import main

    argv = ["plan", "--model", "meta-llama/Meta-Llama-3.1-70B-Instruct", "--gpus", "8", "--gpu-memory", "80GB"]
    assert main(argv) == 1  # one node of 8: not even the sharded states fit
    assert main([*argv, "--nodes", "4"]) == 0  # 32 GPUs
    out = capsys.readouterr().out
    assert "on each of 4 nodes" in out and "8 processes x 4 nodes, fsdp" in out


def test_plan_command_takes_a_run_yaml(tmp_path, capsys):
    from tessera.cli import main

    run = tmp_path / "run.yaml"
    run.write_text("context_length: 2048\ntraining_config: {micro_batch_tokens: 4096, activation_checkpointing: true, precision: fp32}\n")
    rc = main(["plan", "--model", "tessera/smollm2-135m-instruct", "--config", str(run), "--gpus", "1", "--gpu-memory", "24GB"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "context 2048 tokens, fp32 compute (set by the run)" in out
    assert "micro_batch_tokens 4096 (2 rows of 2048) with activation checkpointing" in out


def test_plan_command_for_a_local_model_directory(tiny_model_dir, capsys):
    from tessera.cli import main

    assert main(["plan", "--model", str(tiny_model_dir), "--context-length", "256"]) == 0
    assert "memory plan:" in capsys.readouterr().out


# --- against the real model -------------------------------------------------------------------------


def measure_peak_rss(model_dir: str, context_length: int, rows: int, precision: str, checkpointing: bool) -> int:
    """Peak RSS (bytes) of this process through a training step done as tasks/train/worker.py does it:
    fp32 weights, fused AdamW, a gloo process group, the trainer's imports, packed rows of 4 examples
    with position ids restarting at 0, no attention mask, the chunked loss under autocast.

    The trainer's peak comes from its second step on, when AdamW's states exist during the forward and
    backward passes: they are created here before the one step, so that step shows that peak (and its
    optimizer step the first step's). Run it in a fresh process: a process's peak RSS never goes down."""
    import resource
    import tempfile

    import datasets  # noqa: F401  (the trainer reads its rows with datasets, and reports to MLflow)
    import torch
    import torch.distributed as dist
    from mlflow import MlflowClient  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.train.loss import loss_sum
    from tasks.train.precision import autocast
    from tessera.core.training import IGNORE_INDEX

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)  # as the trainer builds it
        example = context_length // 4
        ids = torch.randint(0, model.config.vocab_size, (rows, context_length))
        pos = torch.arange(context_length).remainder(example).expand(rows, -1).contiguous()
        labels = ids.masked_fill(pos == 0, IGNORE_INDEX)  # every token trained but each example's first
        trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
        for p in params:  # what AdamW's first step creates (its state_dict's layout)
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        with autocast(torch.bfloat16 if precision == "bf16" else torch.float32, torch.device("cpu")):
            loss = loss_sum(model, ids, labels, pos)
        (loss / trained).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.destroy_process_group()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measured_in_subprocess(model_dir: Path, context_length: int, rows: int, precision: str, checkpointing: bool) -> int:
    """measure_peak_rss in a fresh process."""
    args = json.dumps([str(model_dir), context_length, rows, precision, checkpointing])
    code = f"import json; from tests.test_memory import measure_peak_rss; print(measure_peak_rss(*json.loads({args!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_estimate_within_25_percent_of_measured_peak_rss(real_model_dir, checkpointing):
    """In the precision a run on this machine trains in: bf16 compute on a CPU with native bf16, fp32 on others, where
    bf16 is emulated (a step 6x slower: minutes for this test)."""
    from tessera.core.run_plan import resolve_precision

    precision, _ = resolve_precision("auto", "cpu")
    measured = measured_in_subprocess(real_model_dir, 512, 1, precision, checkpointing)
    arch = Architecture.from_config(json.loads((real_model_dir / "config.json").read_text()))
    estimated = estimate(arch, "cpu", 512, 1, precision=precision, activation_checkpointing=checkpointing).total
    assert estimated == pytest.approx(measured, rel=0.25), f"estimate {estimated / GB:.2f} GB, measured {measured / GB:.2f} GB"


def test_a_machine_without_a_gpu_driver_is_planned_without_importing_torch():
    """Every run plans in its stage's process; importing torch there only to learn there is no GPU costs ~2 s."""
    import subprocess
    import sys

    from tessera.core import memory

    if memory.gpu_driver_present():
        pytest.skip("this machine has a GPU driver: torch is asked")
    probe = ("import sys; from tessera.core.memory import Hardware; hw = Hardware.detect(); "
             "print(hw.device, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["cpu", "False"], done.stderr[-2000:]


def test_reading_the_gpu_creates_no_cuda_context_in_this_process(monkeypatch):
    """The train stage plans while torchrun's workers hold the GPUs: it may ask whether there are GPUs, but their
    memory is read in a subprocess (here a stand-in probe, as this machine has no GPU), never through this
    process's torch.cuda, which would create a CUDA context here."""
    import torch

    from tessera.core import memory

    def creates_a_context(*args, **kwargs):
        raise AssertionError("a CUDA context created in the stage's process")

    monkeypatch.setattr(memory, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("get_device_properties", "mem_get_info", "init", "_lazy_init", "set_device", "current_device"):
        monkeypatch.setattr(torch.cuda, name, creates_a_context)
    monkeypatch.setattr(memory, "GPU_MEMORY_PROBE", "print(80 * 10**9)")
    memory.gpu_memory_bytes.cache_clear()
    assert Hardware.detect() == Hardware(device="cuda", count=2, memory_bytes=80 * GB)
