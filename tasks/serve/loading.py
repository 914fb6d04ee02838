"""The registered model and tokenizer, loaded exactly as registered (chat template included)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    task: str  # what it was registered for: llm/v1/chat or llm/v1/completions


def load_registered(model_uri: str) -> LoadedModel:
    """A registry URI's model through MLflow's transformers flavor. On a GPU host the model goes to the GPU in the
    dtype it was saved in; on CPU it stays as saved."""
    import mlflow
    import torch

    from tessera.tracking import mlflow_client

    mlflow_client()
    info = mlflow.models.get_model_info(model_uri)
    components = mlflow.transformers.load_model(model_uri, return_type="components")
    model = components["model"]
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    task = (info.metadata or {}).get("task") or "llm/v1/completions"
    return LoadedModel(model, components["tokenizer"], task)
