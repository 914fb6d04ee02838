"""The registered model and tokenizer, loaded exactly as registered (chat template included)."""

from __future__ import annotations


def load_registered(model_uri: str):
    """(model, tokenizer) of a registry URI, through MLflow's transformers flavor. On a GPU host the model goes to
    the GPU in the dtype it was saved in; on CPU it stays as saved."""
    import mlflow
    import torch

    from tessera.tracking import mlflow_client

    mlflow_client()
    components = mlflow.transformers.load_model(model_uri, return_type="components")
    model = components["model"]
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return model, components["tokenizer"]
