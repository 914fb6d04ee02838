"""Where a training run says what it does: progress lines, the run's events, and its MLflow metrics, params and
artifacts. The worker's `Reporter` (one small object, silent off rank 0, so the loop reports without asking which
rank it is) writes them as marked lines on its output; the train stage, which reads that output anyway, logs them
to the run's MLflow run (`MlflowRelay`). So the worker never imports MLflow: it starts faster, and runs on a bare
GPU machine with torch and transformers. Both ends of that line format live here."""

from __future__ import annotations

import json
import logging
import sys
import time

from tessera.core.runs import append_event
from tessera.core.training import TrainJob

ERROR_MARKER = "TESSERA_TRAIN_ERROR: "  # the train stage turns a line starting with this into the run's one message
RECORD_MARKER = "TESSERA_MLFLOW: "  # a JSON record the train stage logs to the run's MLflow run


class Reporter:
    def __init__(self, job: TrainJob, rank: int):
        self.job, self.active = job, rank == 0

    def say(self, stage: str, line: str) -> None:
        """A progress line: to stderr (the stage relays it to Prefect's log) and to the run's events."""
        if self.active:
            print(line, file=sys.stderr, flush=True)
            append_event(self.job.run_name, stage, line)

    def _record(self, kind: str, **fields) -> None:
        if self.active:
            print(RECORD_MARKER + json.dumps({"kind": kind, **fields}), flush=True)

    def metrics(self, step: int, **values: float) -> None:
        self._record("metrics", step=step, time_ms=int(time.time() * 1000), values={k: float(v) for k, v in values.items()})

    def params(self, **values) -> None:
        self._record("params", values={k: str(v) for k, v in values.items()})

    def artifact(self, data: dict, path: str) -> None:
        self._record("artifact", path=path, data=data)


class MlflowRelay:
    """The train stage's end of the records: each one logged to the run's MLflow run as it arrives. Opened once the
    MLflow run exists; records read before that (none, as the stage opens it before reading) would be dropped."""

    def __init__(self):
        self.client, self.experiment_id, self.run_id = None, None, None

    def open(self, client, experiment_id: str, run_id: str) -> None:
        self.client, self.experiment_id, self.run_id = client, experiment_id, run_id

    def end(self, status: str) -> None:
        """The MLflow run ends FAILED or KILLED with the stage (FINISHED is the register stage's to say)."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)

    def handle(self, line: str) -> bool:
        """Log `line` if it is a record (True), else leave it to the caller (False). A record that cannot be read
        (cut by another process's output) is skipped with a warning: a metric point is not worth failing a run."""
        if not line.startswith(RECORD_MARKER):
            return False
        if self.run_id is None:
            return True
        from mlflow.entities import Metric, Param

        try:
            record = json.loads(line[len(RECORD_MARKER):])
        except ValueError:
            logging.getLogger("tessera").warning("skipped an unreadable training record: %.200s", line)
            return True
        if record["kind"] == "metrics":
            metrics = [Metric(k, v, record["time_ms"], record["step"]) for k, v in record["values"].items()]
            self.client.log_batch(self.run_id, metrics=metrics)
        elif record["kind"] == "params":
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in record["values"].items()])
        elif record["kind"] == "artifact":
            self.client.log_dict(self.run_id, record["data"], record["path"])
        return True


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
