"""The model catalog (configs/models.yaml): which base models exist, their context lengths, retirements."""

from __future__ import annotations

import datetime as dt
import json
import logging
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel

from tessera.config import CONFIGS_DIR
from tessera.errors import ConfigError
from tessera.paths import models_dir

log = logging.getLogger(__name__)

TINY_CHAT = "tessera/tiny-chat"


class ModelSpec(BaseModel):
    name: str
    context_length: int
    retired: dt.date | None = None
    replacement: str | None = None
    learning_rate: float | None = None
    description: str | None = None


class ResolvedModel(BaseModel):
    """A base model ready to load: where its weights are, and how long a context it takes."""

    name: str
    path: str  # a local directory or a Hugging Face id
    context_length: int
    learning_rate: float | None = None
    warnings: list[str] = []


@cache
def catalog() -> dict[str, ModelSpec]:
    raw = yaml.safe_load((CONFIGS_DIR / "models.yaml").read_text())
    specs = [ModelSpec(**m) for m in raw["local"] + raw["models"]]
    return {s.name: s for s in specs}


def resolve_model(name: str, context_length: int | None = None) -> ResolvedModel:
    """Find a base model, build the local tiny one on first use, and check the requested context length."""
    spec = catalog().get(name)
    warnings: list[str] = []
    if name == TINY_CHAT:
        from tessera.tiny_model import build_tiny_chat

        path = str(build_tiny_chat(models_dir() / "tiny-chat", context_length=spec.context_length))
        max_len = spec.context_length
    elif spec is not None:
        path, max_len = name, spec.context_length
        if spec.retired:
            warnings.append(
                f"{name} was retired by the managed service on {spec.retired}; it still trains here, "
                f"but consider {spec.replacement}"
            )
    else:
        path, max_len = name, _context_length_from_config(name)
        warnings.append(f"{name} is not in the model catalog; context length {max_len} read from its config")
    if context_length is not None and context_length > max_len:
        raise ConfigError(f"context_length {context_length}: above {name}'s maximum of {max_len} tokens")
    for w in warnings:
        log.warning(w)
    lr = spec.learning_rate if spec else None
    return ResolvedModel(name=name, path=path, context_length=context_length or max_len, learning_rate=lr, warnings=warnings)


def _context_length_from_config(name: str) -> int:
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
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if value:
            return int(value)
    raise ConfigError(f"model {name}: its config does not say its maximum context length")
