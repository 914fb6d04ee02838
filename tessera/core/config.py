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
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tessera.core.errors import ConfigError, TesseraError

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


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


class TrainingSettings(BaseModel):
    """Tessera's `training_config`: the settings the managed service chose for its users. Every field has a
    default; `None` means "decided per run" (by the hardware, the data or the memory plan), and the run
    records what was decided and why."""

    model_config = ConfigDict(extra="forbid")

    nproc_per_node: int | None = Field(
        None, gt=0, description="training processes on this machine (default: every visible GPU, or 1 on CPU)"
    )
    nnodes: int = Field(
        1, ge=1, description="machines training together: node 0 runs the run's train stage, each other one joins it with "
        "`tessera runs join NAME` (torchrun's c10d rendezvous at rdzv_endpoint)"
    )
    rdzv_endpoint: str | None = Field(
        None, description="host:port on node 0 where the nodes meet (required when nnodes > 1): reachable from every node"
    )
    launcher: Literal["torchrun", "spark"] = Field(
        "torchrun", description="what starts the training processes: torchrun, the node's own (on one node Tessera forks them "
        "as torchrun's standalone mode would; over several, torchrun's rendezvous), or "
        "spark: Spark's TorchDistributor on the run's data_prep_cluster_id (local[N] runs them on this machine)"
    )
    parallelism: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="how the processes share the model: ddp, a full copy in each (16 bytes a parameter); fsdp, "
        "weights, gradients and AdamW states sharded over them; auto: ddp when a full copy fits, else fsdp"
    )
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="tokens per process per forward/backward pass (default: the memory plan picks)"
    )
    global_batch_tokens: int | None = Field(
        None, gt=0,
        description="tokens per optimizer step over all processes (default: at least 8 steps per epoch, at most 128k tokens)",
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warmup over this share of the steps, then linear decay to 0")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this global norm")
    activation_checkpointing: bool | None = Field(
        None, description="recompute each layer in the backward pass instead of keeping its activations (default: the memory plan decides)"
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = Field(
        "auto", description="attention kernel (each keeps packed examples apart); auto: flex_attention on CUDA (no "
                            "L x L mask per row), sdpa on a CPU (FlexAttention has no backward there)"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="compute precision over fp32 master weights; auto: bf16 on CUDA and on CPUs with native bf16, else fp32"
    )
    compile: bool = Field(False, description="torch.compile the model")
    seed: int = Field(0, description="seeds the row order and the model's random state")
    log_every: int = Field(5, gt=0, description="optimizer steps between metric points and progress lines")
    eval_every: int = Field(50, gt=0, description="optimizer steps between evaluations (and always at the end)")
    checkpoint_every: int | None = Field(
        None, gt=0, description="optimizer steps between checkpoints (default: at the end of every epoch, at most one per "
        "eval_every steps when epochs are shorter); always one at the end"
    )
    keep_checkpoints: int = Field(
        3, ge=1, description="checkpoints kept: the last ones, plus the one with the best eval loss (the final model is kept apart)"
    )
    checkpoint_dir: str | None = Field(
        None, description="where checkpoints go, a folder per run under it (default: the MLflow run's artifacts); for large "
        "models, a disk with room, shared with every host that may resume the run"
    )
    train_retries: int = Field(
        2, ge=0, description="times a training process that died (not a data error or out-of-memory) is restarted from the "
        "last checkpoint"
    )


    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^\s:]+:\d{1,5}", value):
            raise ConfigError(f"training_config rdzv_endpoint {value!r}: expected host:port, e.g. node0.cluster:29400")
        return value

    @model_validator(mode="after")
    def _nodes_meet_somewhere(self) -> TrainingSettings:
        if self.nnodes > 1 and self.launcher == "spark":
            raise ConfigError(f"training_config nnodes {self.nnodes}: with launcher spark, the Spark cluster places the "
                              "processes; nnodes is for torchrun")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"training_config nnodes {self.nnodes}: rdzv_endpoint is required (host:port on node 0, "
                              "reachable from every node)")
        return self


@cache
def defaults() -> dict:
    return yaml.safe_load((CONFIGS_DIR / "defaults.yaml").read_text())


def load_training_config(value) -> TrainingSettings | dict:
    """`training_config` as given: a TrainingSettings, a dict, or the path of a YAML file of one (a run's YAML
    with a `training_config:` mapping works too). Validation (unknown keys, bad values) is the model's."""
    if value is None:
        return TrainingSettings()
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"training_config {value!r}: not a YAML file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"training_config {path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"training_config {path}: expected a mapping of settings")
        return loaded.get("training_config", loaded)
    return value


def new_run_name(model: str, token: str | None = None) -> str:
    """`<model's short name>-<6 hex>`: a run's name, and the model's name for a two-part register_to. `token` (default
    random) lets a caller derive it from something already unique, such as a Prefect flow run's id."""
    short = re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-")
    return f"{short[:40]}-{token or secrets.token_hex(3)}"


class RunParameters(BaseModel):
    """What a user sets for one training run: the managed service's fm.create parameters (same names, same
    defaults) plus Tessera's `training_config`. The SDK, the CLI, the flow and the Prefect form take these."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_enum_values=False)

    model: str = Field(description="base model: a catalog name (tessera models), a Hugging Face id or a local directory")
    train_data_path: str = Field(
        description="training data: /Volumes/<catalog>/<schema>/<volume>/<file>.jsonl or folder of .txt, a Delta table "
        "<catalog>.<schema>.<table>, or a Hugging Face dataset <name>/<split>"
    )
    register_to: str = Field(
        description="catalog.schema.model (a new version of one model per run) or catalog.schema (a model named after the run)"
    )
    task_type: TaskType = Field(TaskType.CHAT_COMPLETION, description="what the data is and how the model learns from it")
    eval_data_path: str | None = Field(None, description="held-out data in the same form, for eval loss")
    eval_prompts: list[str] | None = Field(None, description="prompts answered (greedily) at each evaluation and at the end")
    custom_weights_path: str | None = Field(None, description="start from these weights instead of the base model's")
    training_duration: str = Field("1ep", description="<n>ep epochs, <n>ba optimizer steps or <n>tok tokens")
    learning_rate: float | None = Field(None, description="peak learning rate (default: the model catalog's, else 1e-5)")
    context_length: int | None = Field(
        None, description="tokens per packed row (default: min(model maximum, 4096), shorter when the data is shorter)"
    )
    validate_inputs: bool = Field(True, description="check the inputs before starting (else the run checks them first)")
    data_prep_cluster_id: str | None = Field(None, description="Spark for data prep: sc://host:port, local[*] or spark://...")
    experiment_path: str | None = Field(None, description="MLflow experiment (default /Users/<you>/tessera)")
    training_config: TrainingSettings = Field(default_factory=TrainingSettings, description="Tessera's training settings")
    serve_to: str | None = Field(
        None,
        description="a named endpoint (tessera endpoints) to serve the result behind once registered: started if it does not "
        "exist, else updated in place; it outlives the run (finetune serves the new version, retrain the @champion)",
    )

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

    @field_validator("training_config", mode="before")
    @classmethod
    def _training_config(cls, v):
        return load_training_config(v)

    @property
    def duration(self) -> Duration:
        return parse_duration(self.training_duration)


    @model_validator(mode="after")
    def _spark_launcher_has_a_cluster(self) -> RunParameters:
        if self.training_config.launcher == "spark" and not self.data_prep_cluster_id:
            raise ConfigError("training_config launcher spark: the run needs data_prep_cluster_id, the Spark cluster its "
                              "training processes run on (local[N] for this machine)")
        return self


class RunConfig(RunParameters):
    """One training run: its parameters, its name and who started it."""

    name: str
    created_by: str = Field(default_factory=getpass.getuser)

    @property
    def parameters(self) -> dict:
        """The run's parameters as the SDK, the CLI and the flow take them (JSON-ready)."""
        return self.model_dump(mode="json", include=set(RunParameters.model_fields), exclude_unset=False)

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
    if isinstance(kwargs.get("task_type"), TaskType):
        kwargs["task_type"] = kwargs["task_type"].value
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
        if err["type"] == "extra_forbidden":
            parent = TrainingSettings if err["loc"][0] == "training_config" else RunParameters
            known = ", ".join(f for f in parent.model_fields)
            raise ConfigError(f"{field}: unknown key (known: {known})") from None
        raise ConfigError(f"{field}: {err['msg']}") from None
    parse_register_to(config.register_to, config.name)  # refuse a bad name now, not after training
    return config
