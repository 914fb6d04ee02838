"""MLflow wiring: the tracking store (embedded SQLite in TESSERA_HOME unless the user set a server)."""

from __future__ import annotations

from tessera.paths import mlflow_artifacts_root, mlflow_tracking_uri


def mlflow_client():
    """An MlflowClient on our store, with the mlflow module pointed at the same place."""
    import mlflow
    from mlflow import MlflowClient

    uri = mlflow_tracking_uri()
    if uri.startswith("sqlite:///"):
        from pathlib import Path

        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, registry_uri=uri)


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if mlflow_tracking_uri().startswith("sqlite:///"):
        root = mlflow_artifacts_root()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    return client.create_experiment(name, artifact_location=location)
