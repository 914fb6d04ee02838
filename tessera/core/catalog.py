"""The model catalog (configs/models.yaml): which base models exist, their context lengths, retirements."""

from __future__ import annotations

import datetime as dt
import json
import logging
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from tessera.core.config import CONFIGS_DIR
from tessera.core.errors import ConfigError
from tessera.core.memory import Architecture
from tessera.core.paths import home_lock, models_dir
from tessera.core.training import unsupported_head_feature, unsupported_model_message

log = logging.getLogger(__name__)

TINY_CHAT = "tessera/tiny-chat"
SMOLLM2 = "tessera/smollm2-135m-instruct"
# The default context length is no longer the model's maximum (131,072 for Llama 3.x): at most this, and
# shorter when the data is (tasks/prepare/stage.py fits it to the longest chat or prompt/response example).
DEFAULT_CONTEXT_CAP = 4096


class ModelSpec(BaseModel):
    name: str
    context_length: int
    retired: dt.date | None = None
    replacement: str | None = None
    learning_rate: float | None = None
    description: str | None = None
    architecture: Architecture | None = None  # so a memory plan needs no download


class ResolvedModel(BaseModel):
    """A base model ready to load: where its weights are, and how long a context it takes."""

    name: str
    path: str  # a local directory or a Hugging Face id
    context_length: int  # the run's: as set, else min(maximum, DEFAULT_CONTEXT_CAP)
    max_context_length: int
    learning_rate: float | None = None
    architecture: Architecture | None = None  # None: a config of a shape we do not know
    warnings: list[str] = []


@cache
def catalog() -> dict[str, ModelSpec]:
    raw = yaml.safe_load((CONFIGS_DIR / "models.yaml").read_text())
    specs = [ModelSpec(**m) for m in raw["local"] + raw["models"]]
    return {s.name: s for s in specs}


def resolve_model(name: str, context_length: int | None = None) -> ResolvedModel:
    """Find a base model, build a local one (tiny-chat, SmolLM2) on first use, and check the requested context length."""
    spec = catalog().get(name)
    warnings: list[str] = []
    if name in (TINY_CHAT, SMOLLM2):
        path = str(_build_local(name, spec))
        max_len, architecture = spec.context_length, _architecture(read_config(path))
    elif spec is not None:
        path, max_len, architecture = name, spec.context_length, spec.architecture
        if spec.retired:
            warnings.append(
                f"{name} was retired by the managed service on {spec.retired}; it still trains here, "
                f"but consider {spec.replacement}"
            )
    else:
        config = read_config(name)
        if feature := unsupported_head_feature({**config.get("text_config", {}), **config}):
            raise ConfigError(unsupported_model_message(name, feature))
        path, max_len, architecture = name, _context_length(name, config), _architecture(config)
        warnings.append(f"{name} is not in the model catalog; context length {max_len} read from its config")
    if context_length is not None and context_length > max_len:
        raise ConfigError(f"context_length {context_length}: above {name}'s maximum of {max_len} tokens")
    for w in warnings:
        log.warning(w)
    lr = spec.learning_rate if spec else None
    return ResolvedModel(
        name=name, path=path, context_length=context_length or min(max_len, DEFAULT_CONTEXT_CAP), max_context_length=max_len,
        learning_rate=lr, architecture=architecture, warnings=warnings,
    )


def _build_local(name: str, spec: ModelSpec) -> Path:
    """Built once under a lock in TESSERA_HOME: runs started at the same moment on a fresh home wait for one build."""
    with home_lock(f"model-{name.split('/')[-1]}"):
        if name == TINY_CHAT:
            from tessera.core.tiny_model import build_tiny_chat

            return build_tiny_chat(models_dir() / "tiny-chat", context_length=spec.context_length)
        from tessera.core.smollm2 import build_smollm2

        return build_smollm2(models_dir() / "smollm2-135m-instruct")


def _architecture(config: dict) -> Architecture | None:
    """The shape a memory plan needs; None for a config that does not state it in Llama-style keys (GPT-2, DBRX),
    which only matters once a plan is asked for, and that says so."""
    try:
        return Architecture.from_config(config)
    except ValidationError:
        return None


def read_config(name: str) -> dict:
    """A model's config.json (a local directory's, else the Hugging Face Hub's, offline from its cache)."""
    local = Path(name).expanduser()
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.exists():
            raise ConfigError(f"model {name}: directory has no config.json (not a Hugging Face model directory)")
        config = json.loads(config_file.read_text())
    else:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name).to_dict()
        except Exception as exc:  # offline, unknown id, gated repo: all one message for the user
            raise ConfigError(
                f"model {name}: not in the catalog, not a local directory, and its config could not be "
                f"loaded from the Hugging Face Hub ({type(exc).__name__})"
            ) from None
    return config


def _context_length(name: str, config: dict) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if value:
            return int(value)
    raise ConfigError(f"model {name}: its config does not say its maximum context length")
