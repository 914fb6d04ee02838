"""Stage: train. Opens the MLflow run, then launches the training worker under torchrun and follows it."""

from __future__ import annotations

import collections
import subprocess
import sys

from prefect import task
from pydantic import BaseModel

from tasks import stage_logger
from tasks.prepare import PreparedData
from tasks.train_worker import TrainJob
from tasks.validate import DataReport, histogram_png
from tessera import runs
from tessera.catalog import resolve_model
from tessera.config import RunConfig, defaults
from tessera.errors import TesseraError
from tessera.paths import mlflow_tracking_uri
from tessera.tracking import experiment_id, mlflow_client

class TrainedModel(BaseModel):
    model_dir: str
    experiment_id: str
    mlflow_run_id: str


def torchrun_command(job_file: str, nproc: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "tasks.train_worker", job_file,
    ]


def stop_torchrun(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM first: torchrun then stops its workers (they run in sessions of their own); SIGKILL if it hangs."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def train(
    config: RunConfig, prepared: PreparedData, report: DataReport | None = None, eval_prepared: PreparedData | None = None
) -> TrainedModel:
    model = resolve_model(config.model, config.context_length)
    lr = config.learning_rate or model.learning_rate or defaults()["train"]["learning_rate"]
    client = mlflow_client()
    exp_id = experiment_id(client, config.experiment)
    run = client.create_run(exp_id, run_name=config.name, tags={"tessera.run_name": config.name})
    run_id = run.info.run_id
    runs.update(config.name, experiment_id=exp_id, run_id=run_id)
    params = {
        "model": config.model, "task_type": config.task_type.value, "train_data_path": config.train_data_path,
        "training_duration": config.training_duration, "learning_rate": lr,
        "context_length": model.context_length, "register_to": config.register_to,
        "prepared_data.cache_key": prepared.cache_key, "prepared_data.reused": prepared.reused,
        **{f"data.{k}": v for k, v in prepared.stats.model_dump().items()},
        **prepared.lineage,
        **{f"train.{k}": v for k, v in config.train.model_dump().items()},
    }
    for key, value in params.items():
        client.log_param(run_id, key, value)
    if report is not None:
        client.log_dict(run_id, report.model_dump(mode="json"), "data_report/report.json")
        client.log_text(run_id, report.render(), "data_report/report.txt")
        client.log_artifact(run_id, str(histogram_png(report, runs.run_dir(config.name) / "token_lengths.png")), "data_report")

    out_dir = runs.run_dir(config.name) / "final_model"
    job = TrainJob(
        run_name=config.name, model_path=model.path, custom_weights_path=config.custom_weights_path,
        task_type=config.task_type, eval_prompts=config.eval_prompts or [],
        prepared_path=prepared.path, eval_prepared_path=eval_prepared.path if eval_prepared else None, output_dir=str(out_dir), duration=config.duration, learning_rate=lr,
        settings=config.train, mlflow_tracking_uri=mlflow_tracking_uri(), mlflow_run_id=run_id,
    )
    job_file = runs.run_dir(config.name) / "train_job.json"
    job_file.write_text(job.model_dump_json(indent=2))

    log = stage_logger()
    cmd = torchrun_command(str(job_file), config.train.nproc_per_node)
    log.info("launching: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            for line in proc.stdout:
                tail.append(line.rstrip())
                log.info(line.rstrip())
        except BaseException:  # cancelled (SIGTERM reaches the flow as an exception) or crashed
            stop_torchrun(proc)
            client.set_terminated(run_id, "KILLED")
            raise
    if proc.returncode != 0 or not out_dir.exists():
        client.set_terminated(run_id, "FAILED")
        raise TesseraError(f"training failed (torchrun exit code {proc.returncode}); last output:\n" + "\n".join(tail))
    return TrainedModel(model_dir=str(out_dir), experiment_id=exp_id, mlflow_run_id=run_id)


train_model = task(train, name="train")
