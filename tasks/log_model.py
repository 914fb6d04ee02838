"""The register stage's program: a model folder logged as an MLflow run's model, with MLflow's transformers flavor, and
registered as a new version of a registered model.

    python -m tasks.log_model RUN_ID MODEL_DIR TASK REGISTERED_MODEL_NAME

The flavor imports transformers' pipelines and torch (~4 s of a core), which the flow's own process has no other use
for: the stage runs this program forked from a fork server that has imported them once (tasks/warm.py,
tessera.core.forkserver; log_model_warm), and its last line of output is `{"version": "<the version registered>"}`.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from tasks.warm import PROGRAM_IMPORTS
from tessera.core.errors import TesseraError

SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


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


def _stored_dtype(model_dir: str | Path) -> str | None:
    """The dtype the trainer wrote the weights in (config.json), as the transformers flavor records it: serving loads
    the model in it."""
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


RESULT_MARKER = "TESSERA_LOGGED_MODEL: "


def log_model_warm(run_id: str, model_dir: str | Path, task: str, registered_model_name: str) -> str:
    """log_model_folder() in the MLflow run `run_id`, run by this module's program in a process forked warm; the
    version registered. A failure raises TesseraError with the program's last lines."""
    import collections
    import os

    from tessera.core import forkserver

    cmd = [sys.executable, "-m", "tasks.log_model", run_id, str(model_dir), task, registered_model_name]
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with forkserver.popen(cmd, dict(os.environ), preload=PROGRAM_IMPORTS) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
    found = [line[len(RESULT_MARKER):] for line in tail if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not found:
        raise TesseraError(f"logging {model_dir} to MLflow failed (exit code {proc.returncode}): " + " | ".join(tail))
    return json.loads(found[-1])["version"]


def main(run_id: str, model_dir: str, task: str, registered_model_name: str) -> None:
    import mlflow

    from tessera.core.tracking import mlflow_client

    mlflow_client()  # the home's tracking store (or MLFLOW_TRACKING_URI's), as the stage's
    with mlflow.start_run(run_id=run_id):
        info = log_model_folder(model_dir, task, registered_model_name)
    print(RESULT_MARKER + json.dumps({"version": str(info.registered_model_version)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
