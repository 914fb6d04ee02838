"""Stage: register. Logs the trained model and tokenizer (chat template included) with MLflow's
transformers flavor and registers it as a new version under one UC-style name, tagged with its lineage,
and points the `challenger` alias at it.

The store is the embedded SQLite one in TESSERA_HOME, or the MLflow server MLFLOW_TRACKING_URI names
(artifacts then go through the server: start it with `--artifacts-destination`)."""

from __future__ import annotations

import re
from contextlib import contextmanager, suppress
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks import stage_logger
from tasks.train.stage import TrainedModel
from tessera.core import registry, runs
from tessera.core.config import RunConfig, TaskType
from tessera.core.tracking import mlflow_client

CHALLENGER = "challenger"  # the newest version: the retrain flow compares it with @champion
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


class RegisteredVersion(BaseModel):
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_packages() -> set[str]:
    """The packages the project declares (pyproject.toml's `dependencies`, else the installed metadata's), canonical names."""
    if PYPROJECT.is_file():
        import tomllib

        requirements = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    else:
        from importlib.metadata import requires

        requirements = [r for r in requires("tessera") or [] if "extra ==" not in r]
    return {_canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r).group(1)) for r in requirements}


def serving_requirements() -> list[str]:
    """What serving the model needs, pinned to this environment's versions (so MLflow does not spend a minute
    inferring them): only packages the project declares, without local version labels (`2.13.0+cpu` -> `2.13.0`,
    which no index serves). MLflow adds its own pin."""
    from importlib.metadata import version

    declared = declared_packages()
    return [f"{pkg}=={version(pkg).split('+', 1)[0]}" for pkg in SERVING_PACKAGES if _canonical(pkg) in declared]


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


def _stored_dtype(model_dir: str | Path) -> str | None:
    """The dtype the trainer wrote the weights in (config.json), as the transformers flavor records it: serving loads
    the model in it."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return f"torch.{dtype}" if dtype else None


@contextmanager
def _task_class_names_for_mlflow():
    """MLflow 3.17 logs a checkpoint folder (without loading the model) by reading the pipeline class's `__name__`
    from transformers' task table, which transformers 5 fills with dotted names: for the length of the call, the table
    answers with a stand-in class of that name (all MLflow reads of it)."""
    from transformers import pipelines

    check_task = pipelines.check_task

    def with_class_names(task):
        name, meta, options = check_task(task)
        if isinstance(meta.get("impl"), str):
            meta = {**meta, "impl": type(meta["impl"].rsplit(".", 1)[-1], (), {})}
        return name, meta, options

    pipelines.check_task = with_class_names
    try:
        yield
    finally:
        pipelines.check_task = check_task


# What the train stage opens first (MLflow's SQLite stores), then what registering needs (MLflow's transformers flavor,
# which imports transformers' pipelines and torch: ~5 s of one core). In this order a module both need is imported
# once, by whichever thread gets to it first, and the flavor's imports overlap the workers' start, not the stage's.
IMPORTED_WHILE_TRAINING = ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
                           "mlflow.transformers", "transformers.pipelines")


def import_while_training() -> None:
    """IMPORTED_WHILE_TRAINING, on a thread of its own: done by the time the model is trained. An import that fails
    here fails again, with its message, where a stage makes it."""
    import importlib
    import threading

    def import_flavor() -> None:
        with suppress(Exception):
            for module in IMPORTED_WHILE_TRAINING:
                importlib.import_module(module)

    threading.Thread(target=import_flavor, name="register-imports", daemon=True).start()


def log_model_folder(model_dir: str | Path, task: str, registered_model_name: str):
    """Log a model folder (the trainer's, or any in the base model's format) as the active MLflow run's `model`, with
    MLflow's transformers flavor, and register it as a new version of `registered_model_name`. MLflow copies the files
    and never loads the weights into this process (an 8B model would take 16 GB here). `task`: llm/v1/chat or
    llm/v1/completions. Returns MLflow's ModelInfo."""
    import mlflow

    with _task_class_names_for_mlflow():
        return mlflow.transformers.log_model(
            transformers_model=str(model_dir),
            name="model",
            task=task,
            registered_model_name=registered_model_name,
            pip_requirements=serving_requirements(),
            torch_dtype=_stored_dtype(model_dir),
        )


@task(name="register-model")
def register_model(config: RunConfig, trained: TrainedModel) -> RegisteredVersion:
    """Log the trained model's folder as the run's model and register it (log_model_folder), tagged with its lineage,
    as @challenger. A flow run that gets here again after registering (rescheduled after a crash past this stage, or
    resumed after its deploy step failed) gets back the version its MLflow run made, not a second copy of the same
    weights; @challenger then moves to it only if no newer version was registered meanwhile."""
    import mlflow

    client = mlflow_client()
    name = config.registered_model_name
    task_name = "llm/v1/chat" if config.task_type is TaskType.CHAT_COMPLETION else "llm/v1/completions"
    try:
        known = registry.versions(client, name)  # newest first
        mine = [v for v in known if v.run_id == trained.mlflow_run_id]
        if mine:
            version = str(mine[0].version)
        else:
            with mlflow.start_run(run_id=trained.mlflow_run_id):
                info = log_model_folder(trained.model_dir, task_name, name)
            version = str(info.registered_model_version)
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
