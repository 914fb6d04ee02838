"""Idempotence and order, pure: the plan a retrain follows, the hash of its configuration, the version already
registered from the same data and configuration (nothing to do), and a source older than the champion's (refused)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

from pydantic import BaseModel

from tessera.core.config import RunConfig

DECIDED = ("promoted", "rejected")  # the `promotion` tag: a version carries it only once its retrain decided
# What shapes the trained weights (and the eval set they are judged on). Not: where the result is served, how
# inputs are checked, which engine prepares the data, the experiment, the eval prompts, the registered name (the
# check looks only among that model's versions).
HASHED_FIELDS = (
    "model", "train_data_path", "task_type", "eval_data_path", "custom_weights_path", "training_duration",
    "learning_rate", "context_length", "training_config",
)
_PINNED = re.compile(r"@v\d+$")


class RetrainPlan(BaseModel):
    registered_model: str
    config_hash: str
    source_tags: dict[str, str]  # train_data_version or train_data_content_hash
    source_version: int | None  # the order of the data: a Delta version, or the watcher's sequence for a volume
    champion: str | None  # models:/name/N
    skip: Literal["idempotent", "older_source"] | None = None
    existing: str | None = None  # the version an idempotent retrain found
    message: str = ""


def config_hash(config: RunConfig) -> str:
    """A retrain's configuration, hashed: the HASHED_FIELDS, with tables named without their pinned version (the
    version read is the source version, compared on its own)."""
    values = config.model_dump(mode="json", include=set(HASHED_FIELDS))
    for field in ("train_data_path", "eval_data_path"):
        if values.get(field):
            values[field] = _PINNED.sub("", values[field])
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def already_registered(versions: list[tuple[str, dict]], identity: dict[str, str], hashed: str) -> str | None:
    """The first (version, tags) registered from this source identity and configuration hash, and decided: a version
    whose retrain died before its decision (killed while loading the champion, say) is not done."""
    for version, tags in versions:
        same = tags.get("config_hash") == hashed and all(tags.get(k) == v for k, v in identity.items())
        if identity and same and tags.get("promotion") in DECIDED:
            return version
    return None


def older_than_champion(source_version: int | None, champion_tags: dict | None) -> int | None:
    """The champion's source version when this one is older (strictly), else None."""
    if source_version is None or not champion_tags or champion_tags.get("source_version") in (None, ""):
        return None
    theirs = int(champion_tags["source_version"])
    return theirs if source_version < theirs else None
