"""Stage: register. Logs the trained model and tokenizer (chat template included) with MLflow's
transformers flavor and registers it as a new version under one UC-style name."""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel

from tasks import stage_logger
from tasks.train.stage import TrainedModel
from tessera import runs
from tessera.config import RunConfig, TaskType
from tessera.tracking import mlflow_client

class RegisteredVersion(BaseModel):
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def serving_requirements() -> list[str]:
    """Pinned from this environment, so MLflow does not spend a minute inferring them."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}".replace("+cpu", "") for pkg in ("torch", "transformers", "tokenizers", "accelerate")]


def register(config: RunConfig, trained: TrainedModel) -> RegisteredVersion:
    import mlflow
    import transformers

    client = mlflow_client()
    name = config.registered_model_name
    task_name = "llm/v1/chat" if config.task_type is TaskType.CHAT_COMPLETION else "llm/v1/completions"
    try:
        pipeline = transformers.pipeline("text-generation", model=trained.model_dir)
        with mlflow.start_run(run_id=trained.mlflow_run_id):
            info = mlflow.transformers.log_model(
                transformers_model=pipeline,
                name="model",
                task=task_name,
                registered_model_name=name,
                pip_requirements=serving_requirements(),
            )
    except Exception:
        client.set_terminated(trained.mlflow_run_id, "FAILED")
        raise
    version = str(info.registered_model_version)
    for key, value in {
        "base_model": config.model,
        "task_type": config.task_type.value,
        "train_data_path": config.train_data_path,
        "run_name": config.name,
    }.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_terminated(trained.mlflow_run_id, "FINISHED")
    registered = RegisteredVersion(name=name, version=version)
    runs.update(config.name, registered_version=registered.uri)
    runs.append_event(config.name, "register", f"registered {registered.uri}")
    stage_logger().info("registered %s", registered.uri)
    return registered


register_model = task(register, name="register-model")
