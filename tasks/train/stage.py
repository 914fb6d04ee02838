"""Stage: train. Runs the plan the data report made (tessera.core.run_plan.plan_run): starts the training worker
processes, opens the run's MLflow run while they start, then follows them, logging what they report to MLflow. A
worker that dies ends the stage with one message saying why and what to change, never a torchrun traceback."""

from __future__ import annotations

import collections
from collections.abc import Callable
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks import stage_logger
from tasks.prepare.stage import PreparedData
from tasks.train.report import ERROR_MARKER, MlflowRelay
from tasks.validate import DataReport, histogram_png
from tessera.core import runs
from tessera.core.catalog import ResolvedModel
from tessera.core.config import RunConfig
from tessera.core.errors import TesseraError
from tessera.core.processes import free_port, stop_tree
from tessera.core.tracking import experiment_id, mlflow_client
from tessera.core.run_plan import ResolvedRun, RunPlan
from tessera.core.training import TrainJob


class TrainedModel(BaseModel):
    model_dir: str
    experiment_id: str
    mlflow_run_id: str


def worker_command(job_file: str, nproc: int) -> tuple[list[str], dict[str, str]]:
    """How the worker processes start, and their environment. Several go through torchrun, which starts and
    watches them; a lone one is started directly, with the environment torchrun would give it (a group of one on
    a free local port): torchrun's own start costs seconds and has nothing to coordinate."""
    worker = ["-m", "tasks.train.worker", job_file]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *worker], dict(os.environ)
    group_of_one = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return [sys.executable, *worker], dict(os.environ, **group_of_one)


def failure_reason(output: list[str], returncode: int, plan: RunPlan) -> str:
    """The one message for failed workers: the worker's own, else what the exit says (the OOM killer's SIGKILL)."""
    for line in output:
        if ERROR_MARKER in line:
            return line.split(ERROR_MARKER, 1)[1]
    killed = returncode == -signal.SIGKILL or any(re.search(r"exitcode\s*:\s*-9\b|Signal 9 \(SIGKILL\)", line) for line in output)
    if killed:  # the lone worker's own exit, or torchrun's report of one of its workers
        s = plan.settings
        return (
            "a training process was killed (SIGKILL), most likely by the out-of-memory killer: the run needed more "
            f"memory than this machine had (planned {plan.memory.total_bytes / 1e9:.1f} GB per process of "
            f"{plan.memory.budget_bytes / 1e9:.1f} GB). Lower training_config micro_batch_tokens (now {s.micro_batch_tokens}), "
            f"set activation_checkpointing: true (now {str(s.activation_checkpointing).lower()}), use fewer processes "
            f"(nproc_per_node, now {s.nproc_per_node}) or a shorter context_length (now {plan.context_length})"
        )
    raised = [line.strip() for line in output if re.match(r"^\w+(Error|Exception|Interrupt)\b", line.strip())]
    cause = raised[0] if raised else f"the training process exited with code {returncode}"
    return f"training failed: {cause} (the whole output is in the train stage's log)"


class ProgressArtifact:
    """Training progress in the Prefect UI: a progress artifact moved by the worker's progress lines ("step 5/9"),
    when the stage runs as a Prefect task; nothing when it is called on its own (bench/train.py)."""

    STEP = re.compile(r"\bstep (\d+)/(\d+)\b")

    def __init__(self, run_name: str):
        from prefect.context import TaskRunContext

        self.id = None
        if TaskRunContext.get() is not None:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(0.0, key="training-progress", description=f"training progress of {run_name}")

    def update(self, line: str) -> None:
        if self.id is not None and (found := self.STEP.search(line)):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, 100.0 * int(found[1]) / int(found[2]))


def launch(job: TrainJob, job_file, log, plan: RunPlan, relay: MlflowRelay,
           while_starting: Callable[[], None] = lambda: None) -> None:
    """Run the job's worker processes, relaying their output to `log` and their records to MLflow; raise
    TesseraError with the reason if they fail. `while_starting` runs once they are started: the seconds a worker
    spends importing and loading are free for the stage's own work."""
    job_file.write_text(job.model_dump_json(indent=2))
    cmd, env = worker_command(str(job_file), job.settings.nproc_per_node)
    log.info("launching: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=60)
    progress = ProgressArtifact(job.run_name)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        try:
            while_starting()
            for line in proc.stdout:
                if relay.handle(line):
                    continue
                tail.append(line.rstrip())
                log.info(line.rstrip())
                progress.update(line)
        except BaseException:  # cancelled (SIGTERM reaches the flow as an exception) or crashed
            stop_tree(proc.pid, grace=30, popen=proc)  # the workers (and torchrun), which a killed torchrun would leave
            raise
    if proc.returncode != 0:
        raise TesseraError(failure_reason(list(tail), proc.returncode, plan))


def log_params(client, run_id: str, params: dict) -> None:
    """Every param in a few batched writes (MLflow takes up to 100 a batch), not one store write each."""
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def train_job(config: RunConfig, model: ResolvedModel, plan: RunPlan, prepared: PreparedData,
              eval_prepared: PreparedData | None, out_dir: Path) -> TrainJob:
    """What the worker processes carry out."""
    return TrainJob(
        run_name=config.name, model_path=model.path, custom_weights_path=config.custom_weights_path,
        task_type=config.task_type, eval_prompts=config.eval_prompts or [], prepared_path=prepared.path,
        eval_prepared_path=eval_prepared.path if eval_prepared else None, output_dir=str(out_dir),
        context_length=plan.context_length, micro_rows=plan.micro_rows, plan=plan.steps,
        learning_rate=plan.learning_rate, settings=plan.settings,
    )


@task(name="train")
def train_model(
    run: ResolvedRun, prepared: PreparedData, report: DataReport, eval_prepared: PreparedData | None = None
) -> TrainedModel:
    """Train on `prepared` by the plan in `report`; the trained model is written in the base model's format."""
    config, model, plan = run.config, run.model, report.plan
    log = stage_logger()
    log.info(plan.memory.decided)
    runs.append_event(config.name, "train", f"memory plan: {plan.memory.decided}")
    out_dir = runs.run_dir(config.name) / "final_model"
    relay = MlflowRelay()

    def open_mlflow_run() -> None:
        """The run's MLflow run, its params and the data report, while the workers start (their records wait in
        the pipe until the relay reads them)."""
        client = mlflow_client()
        exp_id = experiment_id(client, config.experiment)
        run_id = client.create_run(exp_id, run_name=config.name, tags={"tessera.run_name": config.name}).info.run_id
        relay.open(client, exp_id, run_id)
        runs.update(config.name, experiment_id=exp_id, run_id=run_id)
        log_params(client, run_id, {
            "model": config.model, "task_type": config.task_type.value, "train_data_path": config.train_data_path,
            "training_duration": config.training_duration, "context_length": plan.context_length,
            "register_to": config.register_to,
            "prepared_data.cache_key": prepared.cache_key, "prepared_data.reused": prepared.reused,
            **{f"data.{k}": v for k, v in prepared.stats.model_dump().items()},
            **prepared.lineage,
            **plan.effective(),
        })
        client.log_dict(run_id, report.model_dump(mode="json"), "data_report/report.json")
        client.log_text(run_id, report.render(), "data_report/report.txt")
        client.log_artifact(run_id, str(histogram_png(report, runs.run_dir(config.name) / "token_lengths.png")), "data_report")

    job = train_job(config, model, plan, prepared, eval_prepared, out_dir)
    try:
        launch(job, runs.run_dir(config.name) / "train_job.json", log, plan, relay, while_starting=open_mlflow_run)
    except BaseException as exc:
        relay.end("FAILED" if isinstance(exc, TesseraError) else "KILLED")
        raise
    return TrainedModel(model_dir=str(out_dir), experiment_id=relay.experiment_id, mlflow_run_id=relay.run_id)
