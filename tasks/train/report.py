"""Where a training run says what it does: MLflow metrics and artifacts, the run's events, stderr lines.
One small object, silent off rank 0, so the loop reports without asking which rank it is."""

from __future__ import annotations

import sys
import time

from tessera.core.runs import append_event
from tessera.core.training import TrainJob

ERROR_MARKER = "TESSERA_TRAIN_ERROR: "  # the train stage turns a line starting with this into the run's one message


class Reporter:
    def __init__(self, job: TrainJob, rank: int):
        self.job, self.active = job, rank == 0
        self.client = None
        if self.active and job.mlflow_run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(job.mlflow_tracking_uri)

    def say(self, stage: str, line: str) -> None:
        """A progress line: to stderr (the stage relays it to Prefect's log) and to the run's events."""
        if self.active:
            print(line, file=sys.stderr, flush=True)
            append_event(self.job.run_name, stage, line)

    def metrics(self, step: int, **values: float) -> None:
        if self.client:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.job.mlflow_run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def params(self, **values) -> None:
        if self.client:
            from mlflow.entities import Param

            self.client.log_batch(self.job.mlflow_run_id, params=[Param(k, str(v)) for k, v in values.items()])

    def artifact(self, data: dict, path: str) -> None:
        if self.client:
            self.client.log_dict(self.job.mlflow_run_id, data, path)


def fail(message: str) -> None:
    """The one line the train stage shows the user when this process cannot go on (any rank may say it)."""
    print(ERROR_MARKER + message.replace("\n", " "), file=sys.stderr, flush=True)


def progress_line(step: int, total: int, loss: float, lr: float, tok_s: float, elapsed: float) -> str:
    done = step / total
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
    eta = elapsed / done * (1 - done) if done else 0
    return (
        f"[{bar}] step {step}/{total} loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s "
        f"elapsed {elapsed:.0f}s eta {eta:.0f}s"
    )
