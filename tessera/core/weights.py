"""Where a run's starting weights come from, when they are not the base model's (`custom_weights_path`).

Three forms, all resolved to a folder on this machine and checked before the run starts:
- a checkpoint of an earlier run: its folder (as `fm.get_checkpoints` lists it), or the `runs:/<run id>/...` URI of
  it in that run's artifacts;
- a registered model version: `models:/<name>/<version>` or `models:/<name>@<alias>` (the transformers flavor's
  `model/` folder inside it);
- a Hugging Face model directory (a local path or a volume path).
The architecture must be the base model's (its type and shapes): the data is tokenized for the base model, and the
weights load into its architecture. The run starts from those weights with a fresh optimizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tessera.core.checkpoints import INFO_FILE, CheckpointInfo
from tessera.core.errors import ConfigError
from tessera.core.paths import resolve_data_path

# what must agree between the base model and the custom weights
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "tie_word_embeddings")


class StartingWeights(BaseModel):
    given: str  # custom_weights_path as the user wrote it
    kind: Literal["checkpoint", "registered", "directory"]
    path: str  # a checkpoint folder, or a Hugging Face model directory


def load_sources(weights: StartingWeights | None, base_path: str) -> tuple[str, str | None]:
    """Where a model that starts from `weights` loads from: the Hugging Face folder, and the checkpoint whose weights
    then go over it (None but for a checkpoint, which holds only tensors: they load into the base model's)."""
    if weights is None:
        return base_path, None
    if weights.kind == "checkpoint":
        return base_path, weights.path
    return weights.path, None


def architecture(config: dict) -> dict:
    return {k: config.get(k) for k in ARCHITECTURE_KEYS if k in config}


def _local(uri: str, given: str) -> Path:
    """An artifact folder as a folder here: where it is, on a store on this file system; else (a tracking server's,
    an object store's) downloaded once into TESSERA_HOME/cache/artifacts. What a `runs:/` or `models:/` URI names
    never changes, so the download is reused."""
    import hashlib

    from tessera.core.paths import tessera_home
    from tessera.core.tracking import download_folder, local_artifact_path

    if (path := local_artifact_path(uri)) is not None:
        return path
    out = tessera_home() / "cache" / "artifacts" / hashlib.sha256(uri.encode()).hexdigest()[:20]
    if not out.is_dir():
        try:
            download_folder(uri, out)
        except Exception as exc:  # noqa: BLE001 - missing, or the store unreachable: one message naming it
            raise ConfigError(f"custom_weights_path {given}: could not download {uri}: {str(exc)[:300]}") from None
    return out


def _registered(given: str) -> Path:
    from tessera.core.registry import NotRegistered, resolve
    from tessera.core.tracking import mlflow_client

    client = mlflow_client()
    try:
        version = resolve(given, client)
    except NotRegistered as exc:
        raise ConfigError(f"custom_weights_path {exc}") from None
    return _local(client.get_model_version_download_uri(version.name, version.version).rstrip("/") + "/model", given)


def _run_artifact(given: str) -> Path:
    from mlflow.exceptions import MlflowException

    from tessera.core.tracking import mlflow_client

    run_id, _, inner = given.removeprefix("runs:/").partition("/")
    try:
        artifacts = mlflow_client().get_run(run_id).info.artifact_uri
    except MlflowException:
        raise ConfigError(f"custom_weights_path {given}: no MLflow run {run_id!r}") from None
    return _local(f"{artifacts.rstrip('/')}/{inner}", given)


def resolve_weights(given: str, base_config: dict) -> StartingWeights:
    """The folder `given` names, what it holds, and a check that it fits the base model (`base_config`: its
    config.json); ConfigError naming the path otherwise."""
    if given.startswith("models:/"):
        path, kind = _registered(given), "registered"
    else:
        path = _run_artifact(given) if given.startswith("runs:/") else resolve_data_path(given)
        kind = "checkpoint" if (path / INFO_FILE).is_file() else "directory"
    if not path.is_dir():
        raise ConfigError(f"custom_weights_path {given}: {path} is not a folder")
    if kind == "checkpoint":
        found = CheckpointInfo.model_validate_json((path / INFO_FILE).read_text()).architecture
    elif (path / "config.json").is_file():
        found = architecture(json.loads((path / "config.json").read_text()))
    else:
        raise ConfigError(f"custom_weights_path {given}: {path} holds neither a checkpoint ({INFO_FILE}) nor a model "
                          "(config.json)")
    wanted = architecture(base_config)
    differ = [f"{k} {found.get(k)!r} (the base model's: {wanted[k]!r})" for k in wanted if k in found and found[k] != wanted[k]]
    if differ:
        raise ConfigError(f"custom_weights_path {given}: not the base model's architecture: " + ", ".join(differ))
    return StartingWeights(given=given, kind=kind, path=str(path))
