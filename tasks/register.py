"""Stage: register. Logs the trained model and tokenizer (chat template included) with MLflow's
transformers flavor (tasks/log_model.py, in a process forked warm) and registers it as a new version
under one UC-style name, tagged with its lineage, and points the `challenger` alias at it.

The store is the embedded SQLite one in TESSERA_HOME, or the MLflow server MLFLOW_TRACKING_URI names
(artifacts then go through the server: start it with `--artifacts-destination`)."""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel

from tasks import stage_logger
from tasks.log_model import log_model_warm
from tasks.train.stage import TrainedModel
from tessera.core import registry, runs
from tessera.core.config import RunConfig, TaskType
from tessera.core.tracking import mlflow_client

CHALLENGER = "challenger"  # the newest version: the retrain flow compares it with @champion


class RegisteredVersion(BaseModel):
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _metric(value: float) -> str:
    return f"{value:.6g}"


def source_tags(params: dict[str, str]) -> dict[str, str]:
    """The exact version of the training data, from the lineage params the train stage logs: a Delta table's version,
    else a file's or folder's content hash. The retrain gate reads these tags to know a version's data (one
    definition, so that what it looks for is what was written)."""
    if params.get("source.version"):
        return {"train_data_version": params["source.version"]}
    if params.get("source.fingerprint") and params.get("source.kind") in ("jsonl", "text_folder"):
        return {"train_data_content_hash": params["source.fingerprint"]}
    return {}


def version_tags(config: RunConfig, trained: TrainedModel, client) -> dict[str, str]:
    """Lineage of one registered version: base model, task type, the data and the exact version of it that was read
    (a Delta table's version or a dataset's fingerprint; a file's or folder's content hash), custom weights, the MLflow
    run and its final train and eval loss (the last value logged; no eval loss without eval data)."""
    run = client.get_run(trained.mlflow_run_id)
    params, metrics = run.data.params, run.data.metrics
    tags = {
        "base_model": config.model,
        "task_type": config.task_type.value,
        "train_data_path": config.train_data_path,
        "run_name": config.name,
        "mlflow_run_id": trained.mlflow_run_id,
    }
    tags.update(source_tags(params))
    if config.custom_weights_path:
        tags["custom_weights_path"] = config.custom_weights_path
    if "loss" in metrics:
        tags["train_loss"] = _metric(metrics["loss"])
    if "eval_loss" in metrics:
        tags["eval_loss"] = _metric(metrics["eval_loss"])
    return tags


@task(name="register-model")
def register_model(config: RunConfig, trained: TrainedModel) -> RegisteredVersion:
    """Log the trained model's folder as the run's model and register it (tasks.log_model), tagged with its lineage,
    as @challenger. A flow run that gets here again after registering (rescheduled after a crash past this stage, or
    resumed after its deploy step failed) gets back the version its MLflow run made, not a second copy of the same
    weights; @challenger then moves to it only if no newer version was registered meanwhile."""
    client = mlflow_client()
    name = config.registered_model_name
    task_name = "llm/v1/chat" if config.task_type is TaskType.CHAT_COMPLETION else "llm/v1/completions"
    try:
        known = registry.versions(client, name)  # newest first
        mine = [v for v in known if v.run_id == trained.mlflow_run_id]
        if mine:
            version = str(mine[0].version)
        else:
            version = log_model_warm(trained.mlflow_run_id, trained.model_dir, task_name, name)
        for key, value in version_tags(config, trained, client).items():
            client.set_model_version_tag(name, version, key, value)
        if not mine or str(known[0].version) == version:
            client.set_registered_model_alias(name, CHALLENGER, version)
    except Exception:
        client.set_terminated(trained.mlflow_run_id, "FAILED")
        raise
    client.set_terminated(trained.mlflow_run_id, "FINISHED")
    registered = RegisteredVersion(name=name, version=version)
    runs.update(config.name, registered_version=registered.uri)
    said = (f"{registered.uri} was registered by this run already: kept, nothing registered again" if mine
            else f"registered {registered.uri} (alias @{CHALLENGER})")
    runs.append_event(config.name, "register", said)
    stage_logger().info(said)
    return registered
