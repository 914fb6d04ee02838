"""Stage: train. Runs the plan the data report made (tessera.core.run_plan.plan_run): starts the training worker
processes, opens the run's MLflow run while they start, then follows them, logging what they report to MLflow. A
worker that dies ends the stage with one message saying why and what to change, never a torchrun traceback."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
import re
import signal
import threading
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from tasks import stage_logger
from tasks.prepare.stage import PreparedData
from tasks.train.mirror import CheckpointMirror
from tasks.train.nodes import worker_command
from tasks.train.report import ERROR_MARKER, PEERS_LOST_MARKER, PREEMPTED_EXIT, SIGTERM_GRACE_S, MlflowRelay
from tasks.validate import DataReport, histogram_png
from tasks.warm import PROGRAM_IMPORTS
from tessera.core import checkpoints, forkserver, runs
from tessera.core.config import RunConfig
from tessera.core.errors import TesseraError
from tessera.core.processes import oom_kill_count, stop_tree
from tessera.core.tracking import (HOST_TAG, RUN_CONFIG_ARTIFACT, RUN_NAME_TAG, experiment_id, heartbeat,
                                   local_artifact_path, mlflow_client)
from tessera.core.run_plan import ResolvedRun, RunPlan
from tessera.core.training import TrainJob


class TrainedModel(BaseModel):
    model_dir: str
    experiment_id: str
    mlflow_run_id: str


class WorkersDied(TesseraError):
    """The training processes died of something a restart from the last checkpoint may get past (a signal, a lost
    node, a preemption), as opposed to what they said is wrong (data, weights, out of memory)."""


def failure(output: list[str], returncode: int, plan: RunPlan, out_of_memory: bool) -> TesseraError:
    """The one message for failed workers, as the error to raise: the worker's own (never retried), an out-of-memory
    kill (never retried: told from other deaths by the count of them, the cgroup's or the kernel log's:
    `out_of_memory`, not by the signal alone), else a death a retry may get past (WorkersDied)."""
    for line in output:
        if ERROR_MARKER in line:
            return TesseraError(line.split(ERROR_MARKER, 1)[1].strip())
    killed = returncode == -signal.SIGKILL or any(re.search(r"exitcode\s*:\s*-9\b|Signal 9 \(SIGKILL\)", line) for line in output)
    if killed and out_of_memory:  # the launcher's exit (its first failed rank's), or torchrun's report of a worker
        s = plan.settings
        return TesseraError(
            "a training process was killed by the out-of-memory killer: the run needed more memory than this "
            f"machine had (planned {plan.memory.total_bytes / 1e9:.1f} GB per process of "
            f"{plan.memory.budget_bytes / 1e9:.1f} GB). Lower training_config micro_batch_tokens (now {s.micro_batch_tokens}), "
            f"set activation_checkpointing: true (now {str(s.activation_checkpointing).lower()}), use fewer processes "
            f"(nproc_per_node, now {s.nproc_per_node}) or a shorter context_length (now {plan.context_length})"
        )
    if killed:
        return WorkersDied("a training process was killed (SIGKILL, and not by the out-of-memory killer)")
    lost = [line.split(PEERS_LOST_MARKER, 1)[1].strip() for line in output if PEERS_LOST_MARKER in line]
    lost += [line.strip() for line in output if "RendezvousConnectionError:" in line]  # torchrun's own: the rendezvous is gone
    if lost:
        return WorkersDied(f"a training process lost contact with another (a process or a node died): {lost[0][:300]}")
    if returncode == PREEMPTED_EXIT:
        return WorkersDied("the training processes were stopped by SIGTERM (a preemption?) after saving a checkpoint")
    raised = [line.strip() for line in output if re.match(r"^\w+(Error|Exception|Interrupt)\b", line.strip())]
    cause = raised[0] if raised else f"the training process exited with code {returncode}"
    return WorkersDied(f"training failed: {cause} (the whole output is in the train stage's log)")


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


def ignore_repeated_sigterms() -> None:
    """While the workers are being stopped, a SIGTERM sent again (fm.cancel repeats it: tessera.sdk) must not cut that
    short; the flow ends once it is done, with the first one's exception. Only the main thread may set handlers."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def launch(job: TrainJob, job_file, log, plan: RunPlan, relay: MlflowRelay,
           while_starting: Callable[[], None] = lambda: None) -> None:
    """Run the job's worker processes, relaying their output to `log` and their records to MLflow; raise
    TesseraError with the reason if they fail. `while_starting` runs once they are started: the seconds a worker
    spends importing and loading are free for the stage's own work (their output waits in the pipe meanwhile).

    The output is read on a thread of its own, never where a cancel's SIGTERM lands (the flow's exception comes in
    this thread, at any point: one inside a read would lose the records read with it), so every record is relayed,
    those the workers print while they stop too."""
    job_file.write_text(job.model_dump_json(indent=2))
    cmd, env = worker_command(str(job_file), job.settings, job.run_name)
    log.info("launching: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=60)
    said: list[str] = []  # the worker's own reason, kept however many ranks' tracebacks follow it
    progress = ProgressArtifact(job.run_name)
    oom_kills = oom_kill_count()
    started, failures = threading.Event(), []

    def relay_output() -> None:
        started.wait()
        try:
            for line in proc.stdout:
                if relay.handle(line):
                    continue
                tail.append(line.rstrip())
                if (ERROR_MARKER in line or PEERS_LOST_MARKER in line) and not said:
                    said.append(line.rstrip())
                log.info(line.rstrip())
                progress.update(line)
        except Exception as exc:  # noqa: BLE001 - raised again in the stage's thread
            failures.append(exc)
            stop_tree(proc.pid, grace=SIGTERM_GRACE_S, popen=proc)

    # forked with their imports done, on one node (tasks.train.standalone); under torchrun over several
    with forkserver.popen(cmd, env, preload=PROGRAM_IMPORTS) as proc:
        reader = threading.Thread(target=relay_output, name="worker-output", daemon=True)
        reader.start()
        try:
            try:
                while_starting()
            finally:
                started.set()
            proc.wait()
            reader.join()
        except BaseException:  # cancelled (SIGTERM reaches the flow as an exception) or crashed
            ignore_repeated_sigterms()
            # the workers (and torchrun, which a killed torchrun would leave) stop within the grace, saving a checkpoint
            stop_tree(proc.pid, grace=SIGTERM_GRACE_S, popen=proc)
            reader.join(timeout=10)
            raise
    if failures:
        raise failures[0]
    if proc.returncode != 0:
        raise failure(said + list(tail), proc.returncode, plan, out_of_memory=oom_kill_count() > oom_kills)


def log_params(client, run_id: str, params: dict) -> None:
    """Every param in a few batched writes (MLflow takes up to 100 a batch), not one store write each."""
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def train_job(run: ResolvedRun, plan: RunPlan, prepared: PreparedData, eval_prepared: PreparedData | None,
              out_dir: Path, checkpoint_dir: Path) -> TrainJob:
    """What the worker processes carry out: from the run's last checkpoint, when it has one."""
    config = run.config
    return TrainJob(
        run_name=config.name, model_path=run.model.path, starting_weights=run.weights,
        task_type=config.task_type, eval_prompts=config.eval_prompts or [], prepared_path=prepared.path,
        eval_prepared_path=eval_prepared.path if eval_prepared else None, output_dir=str(out_dir),
        context_length=plan.context_length, micro_rows=plan.micro_rows, plan=plan.steps,
        learning_rate=plan.learning_rate, settings=plan.settings, checkpoint_dir=str(checkpoint_dir),
        resume_from=checkpoints.latest(checkpoint_dir),
        spark_cluster=config.data_prep_cluster_id if plan.settings.launcher == "spark" else None,
    ).owned_here()


def same_data(name: str, started_on: str | None, prepared: PreparedData) -> None:
    """A resume trains on the prepared rows the run started on (the same prepared-data key: its data and the model's
    tokenizer unchanged, here or on another host), never on other data: that is a new run."""
    if started_on is not None and started_on != prepared.cache_key:
        raise TesseraError(
            f"run {name} cannot resume on other data: its training data was prepared as {started_on} when it started "
            f"and is {prepared.cache_key} now (the data at {prepared.lineage.get('source.path', 'its train_data_path')} "
            "or the model's tokenizer changed since). Start a new run to train on the data as it is now")


def checkpoint_root(config: RunConfig, artifact_uri: str) -> Path:
    """Where the run's checkpoints go: under the training_config's checkpoint_dir, else in the MLflow run's artifacts
    when they are on a file system here, else beside the run's record."""
    if config.training_config.checkpoint_dir:
        return Path(config.training_config.checkpoint_dir).expanduser().resolve() / config.name
    artifacts = local_artifact_path(artifact_uri)
    return (artifacts or runs.run_dir(config.name)) / "checkpoints"


@task(name="train")
def train_model(
    run: ResolvedRun, prepared: PreparedData, report: DataReport, eval_prepared: PreparedData | None = None
) -> TrainedModel:
    """Train on `prepared` by the plan in `report`; the trained model is written in the base model's format. Workers
    that die are restarted from the last checkpoint (training_config train_retries), in the same MLflow run; a run
    that already has one (fm.resume) continues from its last checkpoint."""
    config, plan = run.config, report.plan
    log = stage_logger()
    log.info(plan.memory.decided)
    runs.append_event(config.name, "train", f"memory plan: {plan.memory.decided}")
    out_dir = runs.run_dir(config.name) / "final_model"
    relay = MlflowRelay()
    client = mlflow_client()
    known_run = runs.load(config.name).run_id
    if known_run:  # a resumed run goes on in its MLflow run, on the data it started on
        mlflow_run = client.get_run(known_run)
        same_data(config.name, mlflow_run.data.params.get("prepared_data.cache_key"), prepared)
        client.update_run(known_run, status="RUNNING")
        client.set_tag(known_run, HOST_TAG, runs.this_host())
        relay.open(client, mlflow_run.info.experiment_id, known_run, resumed_run=config.name)
    else:
        exp_id = experiment_id(client, config.experiment)
        tags = {RUN_NAME_TAG: config.name, HOST_TAG: runs.this_host()}
        mlflow_run = client.create_run(exp_id, run_name=config.name, tags=tags)
        relay.open(client, exp_id, mlflow_run.info.run_id)
    artifact_uri = mlflow_run.info.artifact_uri
    root = checkpoint_root(config, artifact_uri)
    runs.update(config.name, experiment_id=relay.experiment_id, run_id=relay.run_id, checkpoint_dir=str(root))
    mirror = None
    if not config.training_config.checkpoint_dir and local_artifact_path(artifact_uri) is None:
        mirror = CheckpointMirror(client, relay.run_id, artifact_uri, root)  # checkpoints copied to the remote store too
        mirror.restore()  # a resume where they are not (another host): the newest one from there

    def log_inputs() -> None:
        """The run's params and data report, while the workers start (their records wait in the pipe meanwhile)."""
        client.set_tag(relay.run_id, "tessera.checkpoint_dir", str(root))
        log_params(client, relay.run_id, {
            "model": config.model, "task_type": config.task_type.value, "train_data_path": config.train_data_path,
            "training_duration": config.training_duration, "context_length": plan.context_length,
            "register_to": config.register_to, "custom_weights_path": config.custom_weights_path,
            "prepared_data.cache_key": prepared.cache_key, "prepared_data.reused": prepared.reused,
            **{f"data.{k}": v for k, v in prepared.stats.model_dump().items()},
            **prepared.lineage,
            **plan.effective(),
        })
        client.log_dict(relay.run_id, config.model_dump(mode="json"), RUN_CONFIG_ARTIFACT)  # a resume elsewhere reads it
        client.log_dict(relay.run_id, report.model_dump(mode="json"), "data_report/report.json")
        client.log_text(relay.run_id, report.render(), "data_report/report.txt")
        client.log_artifact(relay.run_id, str(histogram_png(report, runs.run_dir(config.name) / "token_lengths.png")), "data_report")

    nodes = plan.settings.nnodes
    # a lost node ends every node's torchrun: restarting node 0's alone would wait for nodes nobody restarts
    retries = plan.settings.train_retries if nodes == 1 else 0
    for attempt in range(retries + 1):
        job = train_job(run, plan, prepared, eval_prepared, out_dir, root)
        if nodes > 1:
            join = f"waiting for {nodes - 1} more node(s) at {plan.settings.rdzv_endpoint}: on each, run `tessera runs join {config.name}`"
            log.info(join)
            runs.append_event(config.name, "train", join)
        try:
            with heartbeat(client, relay.run_id), mirror.while_training() if mirror else contextlib.nullcontext():
                launch(job, runs.job_file(config.name), log, plan, relay,
                       while_starting=log_inputs if attempt == 0 and not known_run else lambda: None)
            break
        except WorkersDied as died:
            if attempt == retries:
                relay.end("FAILED")
                why = f"restarted {retries} time(s) already" if nodes == 1 else f"a run over {nodes} nodes is not restarted"
                raise TesseraError(f"{died} ({why})" + checkpoints.resumable_note(root, config.name)) from None
            last = checkpoints.latest(root)
            runs.append_event(config.name, "train", f"{died}; restarting from "
                              f"{'the checkpoint at ' + last.label if last else 'the start'} (retry {attempt + 1} of {retries})")
        except BaseException as exc:
            relay.end("FAILED" if isinstance(exc, TesseraError) else "KILLED")
            raise
    return TrainedModel(model_dir=str(out_dir), experiment_id=relay.experiment_id, mlflow_run_id=relay.run_id)
