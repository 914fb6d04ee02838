"""Where a training run says what it does: progress lines, the run's events, and its MLflow metrics, params and
artifacts. The worker's `Reporter` (one small object, silent off rank 0, so the loop reports without asking which
rank it is) writes them as marked lines on its output; the train stage, which reads that output anyway, logs them
to the run's MLflow run (`MlflowRelay`). So the worker never imports MLflow: it starts faster, and runs on a bare
GPU machine with torch and transformers. Both ends of that line format live here."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

from tessera.core.paths import write_atomic
from tessera.core.runs import append_event, run_dir, update
from tessera.core.training import TrainJob

ERROR_MARKER = "TESSERA_TRAIN_ERROR: "  # the train stage turns a line starting with this into the run's one message
PEERS_LOST_MARKER = "TESSERA_PEERS_LOST: "  # a collective failed: another process (or node) is gone
RECORD_MARKER = "TESSERA_MLFLOW: "  # a JSON record the train stage logs to the run's MLflow run
SIGTERM_GRACE_S = 30  # between SIGTERM and SIGKILL, the train stage's and the launchers': a worker saves a checkpoint in it
PREEMPTED_EXIT = 143  # a worker's exit code (128 + SIGTERM) once it saved a checkpoint on SIGTERM: resumable
ETA_EVERY_S = 10.0
EVAL_TABLE = "eval_prompts.json"  # the eval prompts' answers at each evaluation, checkpoint and the end
# the worker's metric records are also appended to this file in the run's folder: a train stage killed with records
# still unread in the pipe (their steps behind a checkpoint already saved) leaves them to the stage that resumes the run
METRICS_FILE = "metrics.jsonl"


class Reporter:
    def __init__(self, job: TrainJob, rank: int):
        self.job, self.active = job, rank == 0
        self._eta_written = -ETA_EVERY_S

    def say(self, stage: str, line: str) -> None:
        """A progress line: to stderr (the stage relays it to Prefect's log) and to the run's events."""
        if self.active:
            print(line, file=sys.stderr, flush=True)
            append_event(self.job.run_name, stage, line)

    def _record(self, kind: str, **fields) -> None:
        if self.active:
            line = RECORD_MARKER + json.dumps({"kind": kind, **fields})
            if kind == "metrics":  # in the file first: what the stage reads is there too
                with open(run_dir(self.job.run_name) / METRICS_FILE, "a") as f:
                    f.write(line + "\n")
            print(line, flush=True)

    def metrics(self, step: int, **values: float) -> None:
        self._record("metrics", step=step, time_ms=int(time.time() * 1000), values={k: float(v) for k, v in values.items()})

    def params(self, **values) -> None:
        self._record("params", values={k: str(v) for k, v in values.items()})

    def generations(self, step: int, generations: list[dict]) -> None:
        """The eval prompts' answers at `step`: rows of the run's table artifact, which MLflow's UI shows."""
        rows = [{"step": step, **g} for g in generations]
        self._record("table", path=EVAL_TABLE, data={k: [r[k] for r in rows] for k in (rows[0] if rows else {})})

    def eta(self, seconds: float) -> None:
        """The run's estimated end, from the throughput measured so far: written to the run's record at most every
        ETA_EVERY_S (a durable write each, under the record's lock)."""
        if self.active and time.monotonic() - self._eta_written >= ETA_EVERY_S:
            self._eta_written = time.monotonic()
            end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
            update(self.job.run_name, estimated_end_time=end)


class MlflowRelay:
    """The train stage's end of the records: each one logged to the run's MLflow run as it arrives. Opened once the
    MLflow run exists; records read before that (none, as the stage opens it before reading) would be dropped."""

    def __init__(self):
        self.client, self.experiment_id, self.run_id = None, None, None
        self.logged: dict[str, int] = {}  # each metric's last logged step: a resumed worker's earlier steps are not logged twice

    def open(self, client, experiment_id: str, run_id: str, resumed_run: str | None = None) -> None:
        """Log to this MLflow run. `resumed_run`: the name of a run logged to before (a retry, fm.resume), whose
        metrics' last steps are read so that each step stays in its history once (MLflow cannot delete a point), and
        whose metric records that an earlier stage never logged (killed with them unread) are logged now."""
        self.client, self.experiment_id, self.run_id = client, experiment_id, run_id
        if resumed_run is not None:
            for key in client.get_run(run_id).data.metrics:
                self.logged[key] = max(m.step for m in client.get_metric_history(run_id, key))
            written = run_dir(resumed_run) / METRICS_FILE
            for line in written.read_text().splitlines() if written.is_file() else []:
                self.handle(line)

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
            step = record["step"]
            metrics = [Metric(k, v, record["time_ms"], step) for k, v in record["values"].items() if step > self.logged.get(k, -1)]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics)
                self.logged.update({m.key: step for m in metrics})
        elif record["kind"] == "params":
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in record["values"].items()])
        elif record["kind"] == "table" and record["data"]:
            self.client.log_table(self.run_id, record["data"], record["path"])
        return True


def peers_lost(exc: BaseException) -> bool:
    """Whether a collective failed because another training process is gone (killed, or its node lost), which a
    resume from the last checkpoint gets past, unlike what this process itself says is wrong (fail)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or "gloo/transport" in text or "Connection closed by peer" in text


def say_peers_lost(exc: BaseException) -> None:
    print(PEERS_LOST_MARKER + f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr, flush=True)


def outcome_file(outcome_dir: str | Path, rank: int) -> Path:
    return Path(outcome_dir) / f"rank{rank}.json"


def write_outcome(outcome_dir: str | Path, exit_code: int) -> None:
    """How this rank ended (its exit code), for a launcher that does not say it (tasks.train.spark_launcher)."""
    rank = int(os.environ.get("RANK", 0))
    write_atomic(outcome_file(outcome_dir, rank), json.dumps({"rank": rank, "exit_code": exit_code}))


def outcomes(outcome_dir: str | Path, world: int) -> dict[int, int | None]:
    """Each rank's exit code; None for a rank that wrote none (killed, or never started)."""
    found = {}
    for rank in range(world):
        path = outcome_file(outcome_dir, rank)
        found[rank] = json.loads(path.read_text())["exit_code"] if path.is_file() else None
    return found


def fail(message: str) -> None:
    """The one line the train stage shows the user when this process cannot go on (any rank may say it)."""
    print(ERROR_MARKER + message.replace("\n", " "), file=sys.stderr, flush=True)


def progress_line(step: int, total: int, loss: float, lr: float, tok_s: float, elapsed: float, first: int = 0) -> str:
    """`elapsed` is the time this process took for steps first..step (a resumed run starts at `first`)."""
    done = step / total
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
    eta = elapsed / (step - first) * (total - step) if step > first else 0
    return (
        f"[{bar}] step {step}/{total} loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s "
        f"elapsed {elapsed:.0f}s eta {eta:.0f}s"
    )
