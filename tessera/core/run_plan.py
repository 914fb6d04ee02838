"""A run's decisions, each made once. `resolve_run` checks a run's inputs and resolves them (the base model, each
table pinned to the version read) into a ResolvedRun, which every later stage receives. `plan_run` decides its
training settings from the run's own, the model catalog, the hardware, the memory plan and the prepared data;
the data report makes the plan and carries it, and the train stage runs that very plan, so what the report says
is what the trainer runs. MLflow records every value and where it came from. `tessera plan` shares the
hardware-dependent part (`plan_settings`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel

from tessera.core.catalog import ResolvedModel, read_config, resolve_model
from tessera.core.config import RunConfig, TrainingSettings
from tessera.core.errors import ConfigError
from tessera.core.memory import Architecture, Hardware, MemoryPlan, plan_memory
from tessera.core.sources import resolve_source
from tessera.core.training import StepPlan, plan_steps
from tessera.core.weights import StartingWeights, resolve_weights

DEFAULT_MIN_STEPS_PER_EPOCH = 8
DEFAULT_MAX_GLOBAL_BATCH_TOKENS = 128 * 1024
DEFAULT_LEARNING_RATE = 1e-5  # when neither the run nor the model catalog sets one
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no cheap way to tell, so do not guess
        return False
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_precision(setting: str, device: str) -> tuple[str, str]:
    """(fp32 | bf16, why) for the run's `precision` setting on a "cpu" or "cuda" device.

    The rule for `auto`: bf16 compute on CUDA, and on CPUs with native bf16 instructions (AMX or AVX-512
    BF16), where a bf16 step of a 135M model is ~1.5x faster than fp32 and its loss stays within 1% of
    fp32's (tests/test_train_precision.py); fp32 on other CPUs, where bf16 would be emulated and slower.
    """
    if setting != "auto":
        return setting, "set by the run"
    if device == "cuda":
        return "bf16", "auto: a CUDA device"
    if cpu_has_native_bf16():
        return "bf16", "auto: a CPU with native bf16 (" + " or ".join(NATIVE_BF16_CPU_FLAGS) + ")"
    return "fp32", "auto: a CPU without native bf16"


def resolve_attention(setting: str, device: str) -> tuple[str, str]:
    """(the attention kernel, why) for the run's `attn_implementation` on a "cpu" or "cuda" device. Every kernel keeps
    packed examples apart (tests/test_packed_attention.py; bench/gpu_check.py on a GPU); sdpa and eager build an
    L x L mask per packed row, FlexAttention a block mask of a few bytes per 128 x 128 tokens."""
    if setting == "flex_attention" and device == "cpu":
        raise ConfigError("training_config attn_implementation flex_attention: FlexAttention has no backward pass on a "
                          "CPU; use sdpa (or auto)")
    if setting != "auto":
        return setting, "set by the run"
    if device == "cuda":
        return "flex_attention", "auto: a CUDA device (no L x L mask for packed rows)"
    return "sdpa", "auto: a CPU (FlexAttention has no backward there)"


def default_rows_per_step(rows: int, context_length: int) -> int:
    """At least 8 optimizer steps per epoch when there are at least 8 rows, and at most 128k tokens a step."""
    cap = max(1, DEFAULT_MAX_GLOBAL_BATCH_TOKENS // context_length)
    return max(1, min(rows // DEFAULT_MIN_STEPS_PER_EPOCH, cap))

class ResolvedRun(BaseModel):
    """A run whose inputs are checked: its configuration with each table pinned to the version read
    (`main.sales.chats` -> `main.sales.chats@v3`, so every stage and any re-run sees the same data), and its base
    model found (where its weights are, its context length). Made once per run; later stages receive it."""

    config: RunConfig
    model: ResolvedModel
    weights: StartingWeights | None = None  # custom_weights_path: where it is, and what (checked against the model)


def resolve_run(config: RunConfig) -> ResolvedRun:
    """Everything about a run's inputs that needs no pass over the data: the model and context length, and each
    data path (it exists, suits the task, has the right columns). The records themselves are checked as data
    prep streams them."""
    model = resolve_model(config.model, config.context_length)
    weights = resolve_weights(config.custom_weights_path, read_config(model.path)) if config.custom_weights_path else None
    pinned = {}
    for field in ("train_data_path", "eval_data_path"):
        path = getattr(config, field)
        if path:
            pinned[field] = resolve_source(path, config.task_type, cluster=config.data_prep_cluster_id).display
    return ResolvedRun(config=config.model_copy(update=pinned), model=model, weights=weights)


class RunPlan(BaseModel):
    """Every training decision of a run, each with where it came from: the job the worker carries out,
    the numbers the data report shows, and the params MLflow records."""

    settings: TrainingSettings  # resolved: no field is None
    learning_rate: float
    context_length: int
    micro_rows: int
    steps: StepPlan
    memory: MemoryPlan
    sources: dict[str, str]  # setting -> "run", "default", "model catalog", "memory plan", "hardware", "data"

    def effective(self) -> dict[str, str]:
        """MLflow params: each effective value, and (as `<key>.source`) where it came from."""
        values = {"learning_rate": self.learning_rate, **self.settings.model_dump()}
        params = {f"train.{k}": str(v) for k, v in values.items()}
        params |= {f"train.{k}.source": src for k, src in self.sources.items()}
        params |= {
            "train.rows_per_step": str(self.steps.rows_per_step), "train.micro_rows": str(self.micro_rows),
            "train.total_steps": str(self.steps.total_steps), "train.steps_per_epoch": str(self.steps.steps_per_epoch),
            "train.memory_estimate_gb": f"{self.memory.total_bytes / 1e9:.2f}",
        }
        return params


def hardware_settings(settings: TrainingSettings, hardware: Hardware) -> tuple[dict, dict[str, str]]:
    """The processes, the precision and the attention kernel, where the run leaves them to the hardware. Returns
    (the settings decided, where every setting came from)."""
    # a value is the run's when it differs from the default (the set-or-not mark does not survive JSON)
    sources = {k: ("default" if getattr(settings, k) == f.default else "run") for k, f in TrainingSettings.model_fields.items()}
    updates: dict = {}
    if settings.nproc_per_node is None:
        updates["nproc_per_node"], sources["nproc_per_node"] = (hardware.count if hardware.device == "cuda" else 1), "hardware"
    updates["precision"], why = resolve_precision(settings.precision, hardware.device)
    sources["precision"] = f"default ({why})" if settings.precision == "auto" else why
    updates["attn_implementation"], why = resolve_attention(settings.attn_implementation, hardware.device)
    sources["attn_implementation"] = f"default ({why})" if settings.attn_implementation == "auto" else why
    return updates, sources


def plan_settings(settings: TrainingSettings, architecture: Architecture | None, hardware: Hardware,
                  context_length: int, model_name: str) -> tuple[dict, dict[str, str], MemoryPlan]:
    """The hardware's part of a plan: the processes, the precision and the memory plan (parallelism, micro-batch, activation
    checkpointing) for settings that leave them open. Returns (the settings decided, where every setting came
    from, the memory plan); ConfigError when the run does not fit."""
    updates, sources = hardware_settings(settings, hardware)
    if architecture is None:
        raise ConfigError(f"model {model_name}: its architecture is unknown, so its memory cannot be planned")
    memory = plan_memory(
        architecture, hardware, context_length, precision=updates["precision"],
        micro_batch_tokens=settings.micro_batch_tokens, activation_checkpointing=settings.activation_checkpointing,
        nproc=updates.get("nproc_per_node", settings.nproc_per_node), parallelism=settings.parallelism, nnodes=settings.nnodes,
        dense_mask=updates["attn_implementation"] != "flex_attention",
    )
    for key in ("micro_batch_tokens", "activation_checkpointing"):
        if getattr(settings, key) is None:
            updates[key], sources[key] = getattr(memory, key), "memory plan"
    if settings.parallelism == "auto":
        updates["parallelism"], sources["parallelism"] = memory.parallelism, "memory plan"
    return updates, sources, memory


def plan_run(config: RunConfig, model: ResolvedModel, row_tokens: np.ndarray, context_length: int,
             hardware: Hardware | None = None) -> RunPlan:
    """Resolve a run's training settings for this hardware and this prepared data."""
    s = config.training_config
    updates, sources, memory = plan_settings(s, model.architecture, hardware or Hardware.detect(), context_length, model.name)
    if s.global_batch_tokens is None:
        rows_per_step = default_rows_per_step(len(row_tokens), context_length)
        updates["global_batch_tokens"], sources["global_batch_tokens"] = rows_per_step * context_length, "data"
    settings = s.model_copy(update=updates)
    rows_per_step = max(1, settings.global_batch_tokens // context_length)
    if config.learning_rate is not None:
        lr, sources["learning_rate"] = config.learning_rate, "run"
    elif model.learning_rate is not None:
        lr, sources["learning_rate"] = model.learning_rate, "model catalog"
    else:
        lr, sources["learning_rate"] = DEFAULT_LEARNING_RATE, "default"
    return RunPlan(
        settings=settings, learning_rate=lr, context_length=context_length,
        micro_rows=max(1, settings.micro_batch_tokens // context_length),
        steps=plan_steps(config.duration, row_tokens, rows_per_step, settings.seed),
        memory=memory, sources=sources,
    )
