"""Deciding a run's training settings: from the run's own settings, the model catalog, the hardware, the
memory plan and the prepared data. The data report and the train stage both call `plan_run`, so what
the report says is what the trainer runs; MLflow records every value and where it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel

from tessera.core.catalog import ResolvedModel
from tessera.core.config import RunConfig, TrainingSettings
from tessera.core.errors import ConfigError
from tessera.core.memory import Hardware, MemoryPlan, plan_memory
from tessera.core.training import StepPlan, plan_steps

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


def default_rows_per_step(rows: int, context_length: int) -> int:
    """At least 8 optimizer steps per epoch when there are at least 8 rows, and at most 128k tokens a step."""
    cap = max(1, DEFAULT_MAX_GLOBAL_BATCH_TOKENS // context_length)
    return max(1, min(rows // DEFAULT_MIN_STEPS_PER_EPOCH, cap))

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


def plan_run(config: RunConfig, model: ResolvedModel, row_tokens: np.ndarray, context_length: int,
             hardware: Hardware | None = None) -> RunPlan:
    """Resolve a run's training settings for this hardware and this prepared data."""
    hardware = hardware or Hardware.detect()
    s = config.training_config
    # a value is the run's when it differs from the default (the set-or-not mark does not survive JSON)
    sources = {k: ("default" if getattr(s, k) == f.default else "run") for k, f in TrainingSettings.model_fields.items()}
    updates: dict = {}
    if s.nproc_per_node is None:
        updates["nproc_per_node"], sources["nproc_per_node"] = (hardware.count if hardware.device == "cuda" else 1), "hardware"
    updates["precision"], why = resolve_precision(s.precision, hardware.device)
    if s.precision == "auto":
        sources["precision"] = f"default ({why})"
    if model.architecture is None:
        raise ConfigError(f"model {model.name}: its architecture is unknown, so its memory cannot be planned")
    memory = plan_memory(
        model.architecture, hardware, context_length, precision=updates["precision"],
        micro_batch_tokens=s.micro_batch_tokens, activation_checkpointing=s.activation_checkpointing,
        nproc=updates.get("nproc_per_node", s.nproc_per_node),
    )
    for key in ("micro_batch_tokens", "activation_checkpointing"):
        if getattr(s, key) is None:
            updates[key], sources[key] = getattr(memory, key), "memory plan"
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
