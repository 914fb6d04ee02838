"""Typed run configuration: what fm.create takes, validated once, shared by every stage."""

from __future__ import annotations

import getpass
import re
import secrets
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tessera.errors import ConfigError, TesseraError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


class TaskType(str, Enum):
    CHAT_COMPLETION = "CHAT_COMPLETION"
    INSTRUCTION_FINETUNE = "INSTRUCTION_FINETUNE"
    CONTINUED_PRETRAIN = "CONTINUED_PRETRAIN"


class Duration(BaseModel):
    value: int
    unit: Literal["ep", "ba", "tok"]


_DURATION = re.compile(r"^\s*(\d[\d_]*)\s*(ep|ba|tok)\s*$")


def parse_duration(text: str) -> Duration:
    """`'3ep'` epochs, `'500ba'` optimizer steps, `'1_000_000tok'` tokens."""
    match = _DURATION.match(str(text))
    if not match or match.group(1).endswith("_") or "__" in match.group(1):
        raise ConfigError(
            f"training_duration {text!r}: expected <n>ep (epochs), <n>ba (optimizer steps) or <n>tok (tokens), "
            "e.g. '3ep', '500ba', '1_000_000tok'"
        )
    value = int(match.group(1).replace("_", ""))
    if value <= 0:
        raise ConfigError(f"training_duration {text!r}: must be positive")
    return Duration(value=value, unit=match.group(2))


_IDENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def parse_register_to(text: str, run_name: str) -> str:
    """`catalog.schema` -> `catalog.schema.<run_name>`; `catalog.schema.model` as given."""
    parts = str(text).split(".")
    if len(parts) not in (2, 3) or not all(_IDENT.match(p) for p in parts):
        raise ConfigError(
            f"register_to {text!r}: expected 'catalog.schema' or 'catalog.schema.model' "
            "(letters, digits, '_' or '-' in each part)"
        )
    if len(parts) == 2:
        parts.append(re.sub(r"[^A-Za-z0-9_-]", "_", run_name))
    return ".".join(parts)


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    micro_batch_size: int = Field(gt=0)
    grad_accum_steps: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    warmup_ratio: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    log_every: int = Field(gt=0)
    eval_every: int = Field(gt=0)
    seed: int
    nproc_per_node: int = Field(gt=0)


@cache
def defaults() -> dict:
    return yaml.safe_load((CONFIGS_DIR / "defaults.yaml").read_text())


def default_train_settings() -> TrainSettings:
    return TrainSettings(**defaults()["train"])


def new_run_name(model: str) -> str:
    short = re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-")
    return f"{short[:40]}-{secrets.token_hex(3)}"


class RunConfig(BaseModel):
    """One training run, as the managed service's fm.create described it, plus the settings it hid."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    model: str
    train_data_path: str
    register_to: str
    task_type: TaskType = TaskType.CHAT_COMPLETION
    eval_data_path: str | None = None
    eval_prompts: list[str] | None = None
    custom_weights_path: str | None = None
    training_duration: str = "1ep"
    learning_rate: float | None = None
    context_length: int | None = None
    validate_inputs: bool = True
    data_prep_cluster_id: str | None = None
    experiment_path: str | None = None
    created_by: str = Field(default_factory=getpass.getuser)
    train: TrainSettings = Field(default_factory=default_train_settings)

    @field_validator("training_duration")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v

    @field_validator("context_length")
    @classmethod
    def _context_length(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ConfigError(f"context_length {v}: must be a positive number of tokens")
        return v

    @field_validator("learning_rate")
    @classmethod
    def _lr(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ConfigError(f"learning_rate {v}: must be positive")
        return v

    @property
    def duration(self) -> Duration:
        return parse_duration(self.training_duration)

    @property
    def registered_model_name(self) -> str:
        return parse_register_to(self.register_to, self.name)

    @property
    def experiment(self) -> str:
        return (self.experiment_path or defaults()["experiment_path"]).format(user=self.created_by)


def build_run_config(**kwargs) -> RunConfig:
    """RunConfig from user arguments; the first bad field becomes one ConfigError naming it."""
    from pydantic import ValidationError

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.setdefault("name", new_run_name(kwargs.get("model", "run")))
    if "task_type" in kwargs and str(kwargs["task_type"]).upper() not in TaskType.__members__:
        raise ConfigError(
            f"task_type {kwargs['task_type']!r}: expected one of {', '.join(TaskType.__members__)}"
        )
    if "task_type" in kwargs:
        kwargs["task_type"] = str(kwargs["task_type"]).upper()
    try:
        config = RunConfig(**kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, TesseraError):
            raise cause from None
        field = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{field}: {err['msg']}") from None
    parse_register_to(config.register_to, config.name)  # refuse a bad name now, not after training
    return config
