"""The memory model: what a training run needs, from the model's config alone (no weights, no download).

A training process (tasks/train/worker.py) holds fp32 master weights, fp32 gradients and AdamW's two fp32
moments (16 bytes a parameter), the activations autograd keeps for the backward pass (per token and
layer, counted from the Llama code; with activation checkpointing only each layer's input, and one
layer recomputed at a time), one chunk of the loss's logits beside the fp32 gradient of the output layer's
weight that the fused loss accumulates, and a runtime overhead. With parallelism ddp every process keeps a full
copy of the states; with fsdp each keeps 1/N of them, plus the weights it gathers: the embeddings and head for the
whole step, and two decoder layers at a time (the one running and the next), with one layer's unsharded gradients
before they are reduce-scattered. The constants that
are not counted were measured on SmolLM2-135M (tests/test_memory.py: estimate within 12% of the peak RSS
of real steps, with and without checkpointing, 512 to 4096 tokens, bf16 and fp32 compute).
"""

from __future__ import annotations

import math
import os
import re
from functools import cache
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tessera.core.errors import ConfigError
from tessera.core.training import loss_chunk_tokens

GB = 10**9  # what every message and `--gpu-memory 80GB` mean by a GB
CPU_RAM_SHARE = 0.8  # of psutil's available RAM: the rest stays for the OS, page cache and other processes

# The chooser's limits: past them a micro-batch gains little speed, and costs memory. A CPU's matmuls are
# already at full speed at a row of 1024 tokens (a 135M model: the same tokens/s at 1 and 8 rows), so on CPU
# the plan stops at 2048 tokens and leaves the memory free (6 GB instead of 12 for SmolLM2 at 1024).
MAX_MICRO_ROWS = 8
MAX_MICRO_TOKENS = {"cpu": 2048, "cuda": 16384}

# A loss chunk at its peak, in copies of the chunk's fp32 logits: the fused loss holds the matmul's logits (bf16
# under autocast), their fp32 log-softmax (made in place into the softmax gradient) and its bf16 cast, beside an
# fp32 gradient of the head's weight. 3.5 was measured (3.4-3.6) for the autograd loss it replaced, which also
# kept the log-softmax's gradient; kept as the bound (tests/test_memory.py: within 25% of the measured peak).
LOSS_CHUNK_COPIES = 3.5
# Fitted on SmolLM2-135M: torch, transformers, datasets and the MLflow client imported, the tokenizer and
# the model's modules loaded. On CUDA an assumption, not measured: the CUDA context, cuBLAS and NCCL
# workspaces, the caching allocator's fragmentation.
RUNTIME_BYTES = {"cpu": 500 * 10**6, "cuda": 3 * GB}
# Fitted on SmolLM2-135M: glibc keeps freed heap memory resident, and a checkpointed forward frees each
# layer's intermediates between the inputs it keeps, so about this many bytes per hidden unit, token and
# layer stay resident on CPU (1.0-1.4 GB at 4096 tokens a micro-batch). MALLOC_MMAP_THRESHOLD_=1048576
# in the trainer's environment hands them back (measured: 5.4 -> 3.6 GB), and makes this an overestimate.
CPU_CHECKPOINT_SLACK = 10


class Architecture(BaseModel):
    """A decoder-only transformer's shape, as a Hugging Face config.json states it."""

    model_config = ConfigDict(extra="ignore")

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    num_local_experts: int = 1  # mixture of experts (Mixtral, DBRX): experts per layer ...
    num_experts_per_tok: int = 1  # ... and how many each token goes through

    @classmethod
    def from_config(cls, config: dict) -> Architecture:
        """From a config.json dict; GQA models without num_key_value_heads have as many as attention heads."""
        config = {**config.get("text_config", {}), **config}
        config.setdefault("num_key_value_heads", config.get("num_attention_heads"))
        return cls(**config)

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def layer_matrix_parameters(self) -> int:
        """One layer's projection weights: what autocast casts to bf16 (norm weights it leaves in fp32)."""
        h, d = self.hidden_size, self.dims_per_head
        attention = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        mlp = 3 * h * self.intermediate_size * self.num_local_experts
        router = h * self.num_local_experts if self.num_local_experts > 1 else 0
        return attention + mlp + router

    @property
    def parameters(self) -> int:
        h = self.hidden_size
        per_layer = self.layer_matrix_parameters + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + h

    def layer_bytes_per_token(self, compute_bytes: int, context_length: int, dense_mask: bool = True) -> int:
        """What autograd keeps of one decoder layer per token (Llama-style; counted on transformers 5.23).

        With packed rows and no attention mask, transformers builds a block-causal mask, and that mask
        costs twice: sdpa then repeats k/v to every head (its GQA path needs no mask) and keeps its own
        copy of the mask in the compute dtype, per layer: compute_bytes * T per token, O(T^2) per row. FlexAttention
        (`dense_mask` False) keeps a block mask of a few bytes per 128x128 block instead, and k/v at their own heads.
        """
        h, i, heads, d = self.hidden_size, self.intermediate_size, self.num_attention_heads, self.dims_per_head
        c = compute_bytes
        residual = 16 * h  # fp32: each norm's input (the residual stream) and its normalized input
        # autocast casts the norm's output once per projection (q, k, v, gate, up); fp32 shares one per norm
        linear_inputs = 5 * c * h if c < 4 else 2 * 4 * h
        kv_heads = heads if dense_mask else self.num_key_value_heads
        attention = 2 * c * heads * d + 2 * c * kv_heads * d + 4 * heads  # q, k, v, output; fp32 log-sum-exp
        mask = c * context_length if dense_mask else 0
        mlp = 4 * c * i * self.num_experts_per_tok  # gate, silu(gate), up, their product
        norm_stats = 2 * 4  # each norm's 1/rms
        return residual + linear_inputs + attention + mask + mlp + norm_stats


class Hardware(BaseModel):
    """Where the run trains: the device kind, how many per node, and the memory one process may use."""

    device: Literal["cpu", "cuda"]
    count: int  # GPUs on this node (1 on CPU)
    memory_bytes: int  # per device: a GPU's memory; on CPU CPU_RAM_SHARE of the available RAM

    @classmethod
    def detect(cls) -> Hardware:
        if not gpu_driver_present():  # no GPU torch could use: no need to import it (2 s) to be told so
            return cls.this_cpu()
        import torch

        # is_available() and device_count() ask the driver without creating a CUDA context. Reading a GPU's
        # memory through torch would create one in this process (the train stage's), where it holds memory on
        # the GPU while torchrun's workers train (../shared/PITFALLS.md 18): a short subprocess reads it instead.
        if torch.cuda.is_available():
            return cls(device="cuda", count=torch.cuda.device_count(), memory_bytes=gpu_memory_bytes())
        return cls.this_cpu()

    @classmethod
    def this_cpu(cls) -> Hardware:
        import psutil

        return cls(device="cpu", count=1, memory_bytes=int(psutil.virtual_memory().available * CPU_RAM_SHARE))

    def describe(self) -> str:
        if self.device == "cpu":
            return f"CPU RAM ({_gb(self.memory_bytes)}: {CPU_RAM_SHARE:.0%} of what is available)"
        return f"{_count(self.count, 'GPU')} of {_gb(self.memory_bytes)}"


GPU_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd")  # NVIDIA's driver; ROCm's


def gpu_driver_present() -> bool:
    """Whether this machine has a GPU driver at all; without one torch.cuda finds no GPU."""
    return any(os.path.exists(path) for path in GPU_DRIVER_FILES)


GPU_MEMORY_PROBE = "import torch; print(torch.cuda.mem_get_info(0)[1])"


@cache  # a GPU's size does not change: one probe per process, not one per plan
def gpu_memory_bytes() -> int:
    """The first GPU's total memory, read in a process of its own that exits with its CUDA context."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", GPU_MEMORY_PROBE], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        raise RuntimeError(f"could not read the GPU's memory: {probe.stderr.strip()[-500:]}")
    return int(probe.stdout.split()[-1])


class MemoryPlan(BaseModel):
    """The micro-batch and checkpointing a run uses, and the per-process estimate behind them.

    total_bytes is the peak: weights, gradients, optimizer states and the runtime always, plus the larger
    of the backward pass (activations and the loss) and, with more than one process, the flat all-reduce
    buffer of the gradients (the trainer's AdamW is the fused kernel, which makes no gradient-sized copy).
    """

    micro_batch_tokens: int
    activation_checkpointing: bool
    nproc: int  # per node
    nnodes: int = 1
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    estimate_bytes: dict[str, int]  # weights, gradients, optimizer, activations, loss, runtime (+ gathered for fsdp), per process
    total_bytes: int  # per process
    budget_bytes: int  # per process (on CPU, processes share the machine's RAM: budget / nproc)
    decided: str  # one line: what it picked and why

    def render(self) -> str:
        e = self.estimate_bytes
        parts = "  ".join(f"{k} {_gb(v)}" for k, v in e.items())
        step = self.total_bytes - (e["weights"] + e["gradients"] + e["optimizer"] + e["runtime"] + e.get("gathered", 0))
        if step > e["activations"] + e["loss"]:
            parts += f"  (the optimizer step's temporaries, {_gb(step)}, outweigh activations and loss)"
        return "\n".join([
            f"memory plan: {_gb(self.total_bytes)} peak of {_gb(self.budget_bytes)} per process, {_count(self.nproc, 'process')}"
            f"{f' x {self.nnodes} nodes' if self.nnodes > 1 else ''}, "
            f"{self.parallelism}",
            f"  {parts}",
            f"  {self.decided}",
        ])


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def parameters_text(n: int) -> str:
    return f"{n / 1e9:.2f}B parameters" if n >= 10**9 else f"{n / 1e6:.1f}M parameters"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


class Estimate(BaseModel):
    """One configuration's estimate, per process: its parts and its peak."""

    parts: dict[str, int]
    total: int


def estimate(arch: Architecture, device: str, context_length: int, rows: int, *, precision: str,
             activation_checkpointing: bool, nproc: int = 1, sharded: bool = False, dense_mask: bool = True) -> Estimate:
    """Per-process bytes of a training step of `rows` packed rows of `context_length` tokens; `sharded`: FSDP over
    the `nproc` processes; `dense_mask`: an attention that builds the packed rows' L x L mask (sdpa, eager), not
    FlexAttention's block mask."""
    c = 2 if precision == "bf16" else 4
    p, h, layers = arch.parameters, arch.hidden_size, arch.num_hidden_layers
    tokens = rows * context_length
    layer = arch.layer_bytes_per_token(c, context_length, dense_mask)
    cast_weights = 2 * arch.layer_matrix_parameters if c < 4 else 0  # autocast's bf16 copies, kept for backward
    if activation_checkpointing:  # each layer's input kept; one layer recomputed at a time in the backward
        activations = tokens * (layers * 4 * h + layer) + cast_weights
        if device == "cpu":
            activations += tokens * layers * CPU_CHECKPOINT_SLACK * h
    else:
        activations = tokens * layers * layer + layers * cast_weights
    activations += (rows * context_length**2 if dense_mask else 0) + tokens * 8 * h  # the boolean mask; the final norm's input and output
    chunk = min(loss_chunk_tokens(arch.vocab_size), tokens)
    # the chunk; the gathered hidden states; the fp32 gradient of the head's weight, accumulated over the chunks
    # before autograd adds it to the weight's own gradient (2.1 GB for a 128k vocabulary at hidden size 4096)
    loss = int(LOSS_CHUNK_COPIES * chunk * arch.vocab_size * 4) + tokens * 4 * h + 4 * arch.vocab_size * h
    share = nproc if sharded else 1
    parts = {
        "weights": -(-4 * p // share),
        "gradients": -(-4 * p // share),
        "optimizer": -(-8 * p // share),
        "activations": activations,
        "loss": loss,
        "runtime": RUNTIME_BYTES[device],
    }
    if sharded:
        layer_params = arch.layer_matrix_parameters + 2 * h
        embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
        parts["gathered"] = c * (embeddings + 2 * layer_params) + 4 * layer_params
    # With ddp over more than one process the gradients are summed in one flat buffer: a second copy of them.
    step_copy = parts["gradients"] if nproc > 1 and not sharded else 0
    always = parts["weights"] + parts["gradients"] + parts["optimizer"] + parts["runtime"] + parts.get("gathered", 0)
    return Estimate(parts=parts, total=always + max(activations + loss, step_copy))


def plan_memory(arch: Architecture, hardware: Hardware, context_length: int, *, precision: str,
                micro_batch_tokens: int | None, activation_checkpointing: bool | None, nproc: int,
                parallelism: str = "auto", nnodes: int = 1, dense_mask: bool = True) -> MemoryPlan:
    """Choose the parallelism, the micro-batch and activation checkpointing for this model, context and hardware.

    Policy: values the run set are kept (only the None and auto ones are chosen). Parallelism auto is ddp when it
    fits (one process is always ddp: nothing to shard), else fsdp, sharded over every process of the `nnodes`
    nodes. Activation checkpointing is off
    unless not even one row fits without it (it costs a second forward pass). The micro-batch is the
    largest whole number of rows, at most MAX_MICRO_ROWS rows and MAX_MICRO_TOKENS[device] tokens (at least one
    row), that fits. A set micro_batch_tokens is rounded down to whole rows (at least one). If nothing
    fits, ConfigError names what would: fewer micro-batch tokens, activation checkpointing, a shorter
    context, fewer processes on CPU, a GPU with more memory.
    """
    if context_length <= 0:
        raise ConfigError(f"context_length {context_length}: must be a positive number of tokens")
    budget = hardware.memory_bytes // nproc if hardware.device == "cpu" else hardware.memory_bytes
    world = nproc * nnodes
    kinds = ["ddp", "fsdp"] if parallelism == "auto" else [parallelism]
    if parallelism == "auto" and world == 1:
        kinds = ["ddp"]
    for kind in kinds:
        found = _choose(arch, hardware, context_length, budget, precision, micro_batch_tokens, activation_checkpointing,
                        world, sharded=kind == "fsdp", dense_mask=dense_mask)
        if found is not None:
            rows, ckpt, sizes, why = found
            if parallelism == "auto":
                why += "; fsdp: a full copy in each process does not fit" if kind == "fsdp" else "; ddp: a full copy fits"
            decided = (
                f"{kind}, micro_batch_tokens {rows * context_length} ({_count(rows, 'row')} of {context_length}) "
                f"{'with' if ckpt else 'without'} activation checkpointing: "
                f"{_gb(sizes.total)} of {_gb(budget)} per process ({why})"
            )
            return MemoryPlan(
                micro_batch_tokens=rows * context_length, activation_checkpointing=ckpt, nproc=nproc, nnodes=nnodes, parallelism=kind,
                estimate_bytes=sizes.parts, total_bytes=sizes.total, budget_bytes=budget, decided=decided,
            )
    raise ConfigError(_refusal(arch, hardware, context_length, budget, precision, micro_batch_tokens,
                               activation_checkpointing, world, sharded=kinds[-1] == "fsdp", dense_mask=dense_mask))


def _set_rows(micro_batch_tokens: int, context_length: int) -> int:
    return max(1, micro_batch_tokens // context_length)


def _choose(arch, hardware, context_length, budget, precision, micro_batch_tokens, activation_checkpointing,
            nproc, sharded=False, dense_mask=True):
    """(rows, checkpointing, sizes, why) of the policy's choice, or None when nothing allowed fits."""
    if micro_batch_tokens is not None:
        candidates = [_set_rows(micro_batch_tokens, context_length)]
    else:
        most = max(1, min(MAX_MICRO_ROWS, MAX_MICRO_TOKENS[hardware.device] // context_length))
        candidates = list(range(most, 0, -1))
    modes = [activation_checkpointing] if activation_checkpointing is not None else [False, True]
    for ckpt in modes:
        for rows in candidates:
            sizes = estimate(arch, hardware.device, context_length, rows, precision=precision,
                             activation_checkpointing=ckpt, nproc=nproc, sharded=sharded, dense_mask=dense_mask)
            if sizes.total <= budget:
                return rows, ckpt, sizes, _why(rows, ckpt, candidates, micro_batch_tokens, activation_checkpointing)
    return None


def _why(rows, ckpt, candidates, micro_batch_tokens, activation_checkpointing) -> str:
    if micro_batch_tokens is not None:
        size = "micro_batch_tokens set by the run"
    elif rows == candidates[0]:
        size = f"the most the plan takes on this device: {_count(candidates[0], 'row')}"
    else:
        size = "the most rows that fit"
    if activation_checkpointing is not None:
        return f"{size}; activation checkpointing set by the run"
    return f"{size}; checkpointing on: not one row fits without it" if ckpt else size


def _refusal(arch, hardware, context_length, budget, precision, micro_batch_tokens, activation_checkpointing,
             nproc, sharded=False, dense_mask=True) -> str:
    """Why nothing fits, and every change that would."""
    rows = _set_rows(micro_batch_tokens, context_length) if micro_batch_tokens is not None else 1
    ckpt = activation_checkpointing is not False  # the least memory the run's settings allow
    least = estimate(arch, hardware.device, context_length, rows, precision=precision, activation_checkpointing=ckpt,
                     nproc=nproc, sharded=sharded, dense_mask=dense_mask)
    states = sum(least.parts[k] for k in ("weights", "gradients", "optimizer"))
    head = (
        f"does not fit {hardware.describe()}: {_count(rows, 'row')} of {context_length} tokens "
        f"{'with' if ckpt else 'without'} activation checkpointing need{'s' if rows == 1 else ''} "
        f"{_gb(least.total)} per process, {_gb(budget)} available; fp32 weights, gradients and AdamW states "
        f"alone take {_gb(states)} (16 B x {parameters_text(arch.parameters)})"
    )
    if hardware.device == "cuda":
        head += f", sharded over {_count(nproc, 'GPU')} (fsdp)" if sharded else ", and with parallelism ddp every GPU keeps all of them"
    fixes = []
    fixed = dict(hardware=hardware, budget=budget, precision=precision, nproc=nproc, sharded=sharded, dense_mask=dense_mask)
    if micro_batch_tokens is not None and rows > 1:
        found = _choose(arch, context_length=context_length, micro_batch_tokens=None,
                        activation_checkpointing=activation_checkpointing, **fixed)
        if found and found[0] < rows:
            fixes.append(f"micro_batch_tokens {found[0] * context_length} (fewer tokens per micro-batch)")
    if activation_checkpointing is False:
        found = _choose(arch, context_length=context_length, micro_batch_tokens=micro_batch_tokens,
                        activation_checkpointing=True, **fixed)
        if found:
            fixes.append("activation_checkpointing: true")
    if _choose(arch, context_length=context_length, micro_batch_tokens=None, activation_checkpointing=True, **fixed) is None:
        shorter = _longest_context(arch, context_length, fixed)
        if shorter:
            fixes.append(f"context_length {shorter} (one row with activation checkpointing)")
    if hardware.device == "cpu":
        if nproc > 1 and _choose(arch, hardware=hardware, budget=hardware.memory_bytes, context_length=context_length,
                                 precision=precision, micro_batch_tokens=micro_batch_tokens,
                                 activation_checkpointing=activation_checkpointing, nproc=1, dense_mask=dense_mask):
            fixes.append("nproc_per_node 1 (processes on a CPU share its RAM)")
        needed = math.ceil(least.total * nproc / CPU_RAM_SHARE)
        fixes.append(f"a machine with {_gb(needed)} of available RAM")
    else:
        gpus = _fewest_gpus(arch, hardware, context_length, precision, micro_batch_tokens, activation_checkpointing,
                            dense_mask=dense_mask)
        if gpus is not None and gpus <= nproc:
            fixes.append("parallelism: fsdp")
        elif gpus is not None:
            fixes.append(f"parallelism fsdp over {gpus} GPUs of {_gb(hardware.memory_bytes)} (nproc_per_node, or nodes x GPUs)")
        fixes.append(f"{_count(nproc, 'GPU')} of at least {_gb(least.total)}" if sharded else f"a GPU with at least {_gb(least.total)} of memory")
    return head + ". What would fit: " + "; ".join(fixes)


def _fewest_gpus(arch, hardware, context_length, precision, micro_batch_tokens, activation_checkpointing,
                 most: int = 1 << 16, dense_mask: bool = True) -> int | None:
    """The fewest GPUs of this size over which fsdp fits (a binary search: more GPUs never need more each)."""
    def fits(n: int) -> bool:
        return _choose(arch, hardware, context_length, hardware.memory_bytes, precision, micro_batch_tokens,
                       activation_checkpointing, n, sharded=True, dense_mask=dense_mask) is not None

    if not fits(most):
        return None
    low, high = 2, most
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low


def _longest_context(arch, context_length, fixed) -> int | None:
    """The longest context (a multiple of 256 below the asked one) of which one checkpointed row fits."""
    fits = [t for t in range(256, context_length, 256)
            if _choose(arch, context_length=t, micro_batch_tokens=t, activation_checkpointing=True, **fixed)]
    return fits[-1] if fits else None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'80GB' or '80' -> 80 * 10^9 bytes; '80GiB' -> 80 * 2^30."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"memory size {text!r}: expected e.g. 80GB (10^9 bytes) or 80GiB (2^30 bytes)")
    unit = 1024**3 if (match.group(2) or "").lower() == "gib" else GB
    return int(float(match.group(1)) * unit)
