"""The registered model and tokenizer, loaded exactly as registered (chat template included).

From the registry (MLflow) normally; inside a Bento that `tasks.serve.bento` built, from the Bento's model store: the
manifest at the root of the Bento's sources names the registered version it holds and its BentoML tag, and becomes
the default TESSERA_MODEL_URI there, so the Bento serves its model with nothing set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

BENTO_MANIFEST = Path(__file__).resolve().parents[2] / "tessera_bento.json"  # written by tasks.serve.bento, only in a Bento


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    task: str  # what it was registered for: llm/v1/chat or llm/v1/completions


def bento_manifest() -> dict | None:
    """Inside a Bento: {"model_uri": the registered version, "bento_model": its tag in the model store, ...}."""
    return json.loads(BENTO_MANIFEST.read_text()) if BENTO_MANIFEST.is_file() else None


if (_manifest := bento_manifest()) is not None:
    os.environ.setdefault("TESSERA_MODEL_URI", _manifest["model_uri"])


def in_passing_thread(load: Callable[[], T]) -> T:
    """load() in a thread that ends when it returns (what it raises is raised here). On CPU, the OpenMP threads that
    torch's parallel work starts (loading a model does some) wait for more work as long as the thread that started
    them lives; beside the serving batch's own (tasks.serve.batch), more threads wait than there are cores, and
    libgomp then has them sleep instead of spin between parallel regions: every step of the batch took ~50% longer
    (SmolLM2-135M, 1 row: 30 ms when the batch's thread was the only one, 48 with the model loaded in the main
    thread, which lives on)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tessera-load") as loader:
        return loader.submit(load).result()  # leaving the block joins the loader's thread


def load_registered(model_uri: str) -> LoadedModel:
    """A registry URI's model through MLflow's transformers flavor, loaded in a passing thread (in_passing_thread).
    On a GPU host the model goes to the GPU in the dtype it was saved in; on CPU it stays as saved. Inside a Bento
    holding that version, it comes from the Bento."""
    return in_passing_thread(lambda: _load_registered(model_uri))


def _load_registered(model_uri: str) -> LoadedModel:
    import mlflow

    manifest = bento_manifest()
    if manifest is not None and model_uri == manifest["model_uri"]:
        return load_from_bento(manifest["bento_model"])

    from tessera.core.tracking import mlflow_client

    mlflow_client()
    info = mlflow.models.get_model_info(model_uri)
    components = mlflow.transformers.load_model(model_uri, return_type="components")
    return _ready(components, info.metadata)


def load_from_bento(tag: str) -> LoadedModel:
    """A model that `bentoml.mlflow.import_model` put in BentoML's model store (the Bento's own, when serving one)."""
    import bentoml
    import mlflow

    path = bentoml.models.get(tag).path_of("mlflow_model")
    metadata = mlflow.models.Model.load(path).metadata
    return _ready(mlflow.transformers.load_model(path, return_type="components"), metadata)


def _ready(components: dict, metadata: dict | None) -> LoadedModel:
    import torch

    model = components["model"]
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    task = (metadata or {}).get("task") or "llm/v1/completions"
    return LoadedModel(model, components["tokenizer"], task)
