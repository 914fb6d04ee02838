"""The train stage for real: plan_run, torchrun and its worker processes (gloo on CPU), an MLflow store.

Pins the loss for batch splits: 1 process x 1 micro-batch of 8 rows, 1 process x 4 micro-batches of 2,
and 2 processes x 1 micro-batch of 4 all train the same steps and give the same loss curve; and for a resume: a
worker killed (SIGKILL) or preempted (SIGTERM) mid-epoch is restarted from its checkpoint, and the run's losses are
an uninterrupted run's. A bad weights file and an out-of-memory kill each end in one message.
"""

from __future__ import annotations

import json
import os
from contextlib import suppress
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import chat, write_jsonl

pytestmark = pytest.mark.slow

CTX = 64


@pytest.fixture(scope="module")
def trainer_home(tmp_path_factory, tiny_model_dir):
    """One TESSERA_HOME (and MLflow store) for the module, the tiny model in it, ~20 packed rows."""
    home = tmp_path_factory.mktemp("trainer-home")
    (home / "models").mkdir()
    (home / "models" / "tiny-chat").symlink_to(tiny_model_dir)
    records = [chat(f"question {i} " + "why " * (i % 7), "answer " * (1 + i % 9) + str(i)) for i in range(40)]
    data = write_jsonl(home / "chat.jsonl", records)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_HOME", str(home))
        yield home, data


def run_stage(data, duration: str, settings: dict, model: str = "tessera/tiny-chat", learning_rate: float = 2e-3, **params):
    """The train stage (on the tiny model by default) as the flow runs it, on the plan of the data report: its run's
    configuration, prepared data, and what the stage returns."""
    from tasks.prepare.stage import prepare
    from tasks.train.stage import train_model
    from tasks.validate import data_report
    from tessera.core import runs
    from tessera.core.config import build_run_config
    from tessera.core.run_plan import resolve_run

    config = build_run_config(
        model=model, train_data_path=str(data), register_to="main.test.trainer", context_length=CTX,
        training_duration=duration, learning_rate=learning_rate,
        training_config={"precision": "fp32", "log_every": 1, **settings}, **params,
    )
    runs.save(runs.RunRecord(config=config, created_at=runs.now()))
    run = resolve_run(config)
    prepared = prepare(config)
    eval_prepared = prepare(config, config.eval_data_path) if config.eval_data_path else None
    return config, prepared, train_model.fn(run, prepared, data_report(run, prepared), eval_prepared)


def metric(run_id: str, key: str) -> list[float]:

    from tessera.core.tracking import mlflow_client as tracking_client

    history = tracking_client().get_metric_history(run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


SPLIT_BATCH = {"global_batch_tokens": 8 * CTX}


@pytest.fixture(scope="module")
def sharded_run(trainer_home):
    """One epoch trained by FSDP over 2 processes, a checkpoint at every step: compared with ddp below, and resumed
    from its first checkpoint into other numbers of processes."""
    _, data = trainer_home
    settings = {**SPLIT_BATCH, "micro_batch_tokens": 4 * CTX, "nproc_per_node": 2, "parallelism": "fsdp",
                "checkpoint_every": 1, "keep_checkpoints": 10}
    config, _, trained = run_stage(data, "1ep", settings)
    return config, trained


def test_batch_splits_and_processes_give_the_same_losses(trainer_home, sharded_run):
    _, data = trainer_home
    _, prepared, whole = run_stage(data, "1ep", {**SPLIT_BATCH, "micro_batch_tokens": 8 * CTX})
    # activation checkpointing recomputes the same forward: it changes memory, not the losses
    _, _, accumulated = run_stage(data, "1ep", {**SPLIT_BATCH, "micro_batch_tokens": 2 * CTX, "activation_checkpointing": True})
    _, _, two_procs = run_stage(data, "1ep", {**SPLIT_BATCH, "micro_batch_tokens": 4 * CTX, "nproc_per_node": 2,
                                              "parallelism": "ddp"})
    _, sharded = sharded_run  # the same split, sharded (and checkpointed at every step, which changes no loss)

    rows = prepared.stats.rows
    assert rows >= 16, "the test needs several steps"
    steps = -(-rows // 8)  # 1ep: every row once, the last step smaller
    reference = metric(whole.mlflow_run_id, "loss")
    assert len(reference) == steps
    assert reference[-1] < reference[0]
    for other in (accumulated, two_procs):
        assert metric(other.mlflow_run_id, "loss") == pytest.approx(reference, rel=2e-4)
    # FSDP2 against ddp, both fp32 over 2 processes: the same curve, and a saved model that answers the same
    assert metric(sharded.mlflow_run_id, "loss") == pytest.approx(metric(two_procs.mlflow_run_id, "loss"), abs=1e-4)
    assert answers(sharded.model_dir) == answers(two_procs.model_dir)


    from tessera.core.tracking import mlflow_client as tracking_client

    assert tracking_client().get_run(accumulated.mlflow_run_id).data.params["train.activation_checkpointing"] == "True"
    params = tracking_client().get_run(two_procs.mlflow_run_id).data.params
    assert params["world_size"] == "2" and params["train.nproc_per_node"] == "2"
    assert params["train.nproc_per_node.source"] == "run"
    assert params["train.micro_batch_tokens"] == str(4 * CTX)
    assert params["train.warmup_ratio.source"] == "default"
    assert params["train.learning_rate"] == "0.002" and params["train.learning_rate.source"] == "run"
    assert float(metric(two_procs.mlflow_run_id, "peak_rss_mb")[-1]) > 100
    assert metric(two_procs.mlflow_run_id, "tokens_per_sec")[-1] > 0


def answers(model_dir: str) -> list[list[int]]:
    """Greedy answers of a saved model to a few prompts, as the endpoint gives them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tessera.core.generation import generate, prompt_ids

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": f"question {i} why"}]) for i in range(3)]
    return [new for new, _ in generate(model, tokenizer, prompts, 16)]


def test_the_data_report_states_what_the_trainer_runs(trainer_home):
    from tasks.validate import data_report
    from tessera.core.run_plan import resolve_run

    _, data = trainer_home
    config, prepared, trained = run_stage(data, "25tok", {"global_batch_tokens": 4 * CTX}, eval_data_path=str(data))
    report = data_report(resolve_run(config), prepared)
    losses = metric(trained.mlflow_run_id, "loss")
    assert report.optimizer_steps == len(losses) == 1  # 25 tokens: the first step reaches them
    assert report.billed_tokens >= 25 and report.epochs < 1
    assert len(metric(trained.mlflow_run_id, "eval_loss")) == 1  # at the end


def test_a_sharded_checkpoint_resumes_into_one_process_and_into_two(sharded_run, tmp_path):
    """An FSDP run's checkpoint, written sharded by 2 processes, resumes into 1 process (ddp) and into 2 (fsdp): the
    steps after it give the uninterrupted run's losses."""
    import json
    import subprocess

    from tasks.train.report import RECORD_MARKER
    from tasks.train.stage import worker_command
    from tessera.core import checkpoints, runs
    from tessera.core.training import TrainJob

    config, trained = sharded_run
    reference = metric(trained.mlflow_run_id, "loss")
    assert len(reference) >= 3  # two steps or more after the first
    (at_1,) = [c for c in checkpoints.list_checkpoints(runs.load(config.name).checkpoint_dir) if c.step == 1]
    assert at_1.world_size == 2
    job = TrainJob.model_validate_json(runs.job_file(config.name).read_text())
    for nproc, parallelism in ((1, "ddp"), (2, "fsdp")):
        out = tmp_path / f"{nproc}-{parallelism}"
        resumed = job.model_copy(update={
            "resume_from": at_1, "output_dir": str(out / "model"), "checkpoint_dir": str(out / "checkpoints"), "owner_pid": None,
            "settings": job.settings.model_copy(update={"nproc_per_node": nproc, "parallelism": parallelism}),
        })
        (out / "job.json").parent.mkdir(parents=True)
        (out / "job.json").write_text(resumed.model_dump_json())
        cmd, env = worker_command(str(out / "job.json"), resumed.settings, resumed.run_name)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(line[len(RECORD_MARKER):]) for line in done.stdout.splitlines() if line.startswith(RECORD_MARKER)]
        losses = {r["step"]: r["values"]["loss"] for r in records if r["kind"] == "metrics" and "loss" in r["values"]}
        assert sorted(losses) == list(range(2, len(reference) + 1)), (nproc, losses)
        assert [losses[step] for step in sorted(losses)] == pytest.approx(reference[1:], abs=1e-4), (nproc, parallelism)
        assert (out / "model" / "model.safetensors").is_file()


def test_fsdp_keeps_each_process_below_one_full_copy_of_the_training_states(trainer_home, tiny_model_dir, tmp_path):
    """A ~100M-parameter Llama (random init: the states, not the runtime, dominate) trained by FSDP over 2 processes:
    the peak RSS of the process that needed the most stays below one full copy of the fp32 weights, gradients and
    AdamW states (16 bytes a parameter), which is what each ddp process holds; and the memory plan's fsdp estimate is
    within 25% of it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tessera.core.tracking import mlflow_client

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters > 100e6
    model.save_pretrained(tmp_path / "llama-100m")
    tokenizer.save_pretrained(tmp_path / "llama-100m")
    del model

    # instruction data: no chat model's stop check, whose greedy answers would take most of the test's time
    data = write_jsonl(tmp_path / "instructions.jsonl", [{"prompt": f"question {i} why", "response": "answer " * (1 + i % 9)}
                                                         for i in range(16)])
    _, _, trained = run_stage(data, "2ba", {"global_batch_tokens": 4 * CTX, "micro_batch_tokens": 2 * CTX, "nproc_per_node": 2,
                                            "parallelism": "fsdp"}, model=str(tmp_path / "llama-100m"),
                              task_type="INSTRUCTION_FINETUNE")
    peak = metric(trained.mlflow_run_id, "peak_rss_mb")[-1] * 2**20
    full_copy = 16 * parameters
    assert peak < full_copy, f"peak {peak / 1e9:.2f} GB, a full copy of the states {full_copy / 1e9:.2f} GB"
    estimate = float(mlflow_client().get_run(trained.mlflow_run_id).data.params["train.memory_estimate_gb"]) * 1e9
    assert estimate == pytest.approx(peak, rel=0.25), (estimate / 1e9, peak / 1e9)


def join_when_started(run_name: str) -> subprocess.Popen:
    """`tessera runs join NAME`, as another node runs it, in a session of its own (a node that can be lost whole)."""
    return subprocess.Popen([sys.executable, "-m", "tessera.cli", "runs", "join", run_name], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy(), start_new_session=True)


def run_processes(run_name: str) -> list[psutil.Process]:
    """Live processes of the run's training, on any node: torchrun agents and workers given its job."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["status"] != psutil.STATUS_ZOMBIE and ("tasks.train.worker" in cmd or f"--rdzv-id={run_name}" in cmd):
                if f"--rdzv-id={run_name}" in cmd or run_name in open(p.info["cmdline"][-1]).read():
                    found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


LAUNCH_BATCH = {"global_batch_tokens": 8 * CTX, "micro_batch_tokens": 4 * CTX}


@pytest.fixture(scope="module")
def one_process_losses(trainer_home) -> list[float]:
    """The losses of 4 steps in one process: what every launch of several processes must reproduce."""
    _, _, one = run_stage(trainer_home[1], "4ba", {**LAUNCH_BATCH, "nproc_per_node": 1})
    return metric(one.mlflow_run_id, "loss")


def test_two_nodes_train_as_one_node_of_two_processes(trainer_home, one_process_losses):
    """Node 0 (the run's train stage) and a node that joins with `tessera runs join NAME`, one process each, meeting at
    a c10d rendezvous on 127.0.0.1: the loss curve of one process training the same steps."""
    from tessera.core.config import new_run_name
    from tessera.core.processes import free_port

    _, data = trainer_home
    name = new_run_name("two-nodes")
    joined = join_when_started(name)
    try:
        _, _, two = run_stage(data, "4ba", {**LAUNCH_BATCH, "nproc_per_node": 1, "nnodes": 2,
                                            "rdzv_endpoint": f"127.0.0.1:{free_port()}"}, name=name)
        output = joined.communicate(timeout=120)[0]
    finally:
        joined.kill()
    assert joined.returncode == 0, output
    assert f"joining run {name}: 2 nodes of 1 process(es)" in output
    assert metric(two.mlflow_run_id, "loss") == pytest.approx(one_process_losses, rel=2e-4)
    from tessera.core.tracking import mlflow_client

    assert mlflow_client().get_run(two.mlflow_run_id).data.params["world_size"] == "2"


def test_a_lost_node_fails_the_run_at_once_resumable_and_leaves_no_process(trainer_home):
    """The joined node killed whole (its torchrun and CLI; its worker notices its owner gone) after a checkpoint: node
    0's run fails within seconds, saying which step it resumes from, and no process of the run is left after 30 s."""
    from tessera.core import checkpoints, runs
    from tessera.core.config import new_run_name
    from tessera.core.errors import TesseraError
    from tessera.core.processes import free_port

    _, data = trainer_home
    name = new_run_name("lost-node")
    joined = join_when_started(name)

    def kill_after_a_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                root = runs.load(name).checkpoint_dir
            except Exception:  # noqa: BLE001 - not created yet
                root = None
            if root and checkpoints.latest(root) is not None:
                os.killpg(joined.pid, signal.SIGKILL)
                killed.append(time.monotonic())
                return
            time.sleep(0.2)

    killed: list[float] = []
    killer = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    killer.start()
    settings = {"global_batch_tokens": 4 * CTX, "micro_batch_tokens": 4 * CTX, "nproc_per_node": 1, "nnodes": 2,
                "rdzv_endpoint": f"127.0.0.1:{free_port()}", "checkpoint_every": 2}
    try:
        with pytest.raises(TesseraError) as failed:
            run_stage(data, "400ba", settings, name=name)
        ended = time.monotonic()
    finally:
        joined.kill()
        killer.join()
    message = str(failed.value)
    assert killed and ended - killed[0] < 20, "the run did not fail within seconds of losing a node"
    assert "lost contact with another (a process or a node died)" in message
    assert "a run over 2 nodes is not restarted" in message and f"resumable from step" in message, message
    assert f"tessera runs resume {name}" in message
    deadline = ended + 30
    while run_processes(name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_processes(name) == []


def test_spark_torch_distributor_trains_as_torchrun_does(trainer_home, one_process_losses):
    """launcher spark: the run's 2 processes started by TorchDistributor on local[2] (local mode) give the loss curve of
    one process training the same steps, as torchrun's do."""
    _, data = trainer_home
    _, _, spark = run_stage(data, "4ba", {**LAUNCH_BATCH, "nproc_per_node": 2, "launcher": "spark"}, data_prep_cluster_id="local[2]")
    assert metric(spark.mlflow_run_id, "loss") == pytest.approx(one_process_losses, rel=2e-4)
    from tessera.core.tracking import mlflow_client

    assert mlflow_client().get_run(spark.mlflow_run_id).data.params["world_size"] == "2"


FAIL_RANK_1_AFTER_RANK_0_RETURNED = """
import json, os, sys, time

from tasks.train.report import outcome_file, write_outcome
from tasks.train.spark_launcher import launch


def train(outcome_dir):
    # rank 0 ends well and returns; rank 1 waits for that, then fails
    if os.environ["RANK"] == "0":
        write_outcome(outcome_dir, 0)
        return
    while not outcome_file(outcome_dir, 0).exists():
        time.sleep(0.1)
    time.sleep(1)
    write_outcome(outcome_dir, 1)
    raise RuntimeError("rank 1 fails after rank 0 returned")


print(json.dumps(launch("local[2]", 2, train, sys.argv[1], outcome_dir=sys.argv[1])))
"""


def test_a_rank_failing_after_another_returned_fails_the_spark_launch_naming_it(tmp_path, capsys):
    """TorchDistributor reports such a run as a success (STACK.md); the launcher reads every rank's outcome instead.
    Launched from a process of its own, as the train stage does (one process holds one classic Spark session)."""
    import json

    from tasks.train.spark_launcher import verdict

    script = tmp_path / "launch.py"
    script.write_text(FAIL_RANK_1_AFTER_RANK_0_RETURNED)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "outcomes")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ended = {int(rank): code for rank, code in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    assert ended == {0: 0, 1: 1}
    assert verdict(ended) == 1
    said = capsys.readouterr().err
    assert "training failed on rank 1 (exit code 1); every other rank: [0] ended well" in said
    assert verdict({0: 0, 1: 0}) == 0 and verdict({0: 143, 1: 143}) == 143


def stop_the_worker_after_a_checkpoint(sig: int, stopped: list) -> threading.Thread:
    """A thread that sends `sig` to the training worker (a rank forked by the launcher that the fork server forked for
    this process's train stage, or a child of this process) once the run it trains has a complete checkpoint, while it
    trains on: mid-run, and (with checkpoint_every off the epoch length) mid-epoch."""
    import json

    from tessera.core import checkpoints, forkserver

    def workers():
        for p in psutil.Process().children(recursive=True):
            with suppress(psutil.Error):
                yield p.pid, p.cmdline()
        for pid, cmd in forkserver.forked():  # the launcher forked them (tasks.train.standalone): its command
            with suppress(psutil.Error):
                yield from ((child.pid, cmd) for child in psutil.Process(pid).children())

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline and not stopped:
            for pid, cmd in workers():
                try:
                    if "tasks.train.worker" in cmd:
                        root = json.loads(open(cmd[-1]).read())["checkpoint_dir"]
                        if checkpoints.latest(root) is not None:
                            os.kill(pid, sig)
                            stopped.append(checkpoints.latest(root))
                            return
                except (OSError, ValueError):
                    pass
            time.sleep(0.02)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


RESUME_SETTINGS = {"global_batch_tokens": 4 * CTX, "checkpoint_every": 7, "log_every": 1}


@pytest.fixture(scope="module")
def uninterrupted(trainer_home):
    """The reference: the same run as the interrupted ones below, never interrupted."""
    _, data = trainer_home
    config, prepared, trained = run_stage(data, "60ba", RESUME_SETTINGS, eval_data_path=str(data))
    return prepared, metric(trained.mlflow_run_id, "loss"), config, trained


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, "killed-while-saving"],
                         ids=["SIGKILL", "SIGTERM", "killed-while-saving"])
def test_a_stopped_worker_is_restarted_from_its_checkpoint_and_the_run_ends_as_if_uninterrupted(
        trainer_home, uninterrupted, sig, monkeypatch, tmp_path):
    """SIGKILL (a crash; no out-of-memory evidence) or SIGTERM (a preemption: the worker saves a checkpoint first)
    after a checkpoint, mid-epoch, or SIGKILL while a checkpoint is being saved (its files written, not yet marked
    complete): the stage restarts the worker from the last complete checkpoint, in the same MLflow run; every step
    runs once, and the losses after the resume point are the uninterrupted run's."""
    from tessera.core import checkpoints, runs
    from tessera.core.tracking import mlflow_client

    _, data = trainer_home
    prepared, reference, _, _ = uninterrupted
    if sig == "killed-while-saving":  # the second checkpoint's (step 14's) save, once: the restart goes past it
        monkeypatch.setenv("TESSERA_FAULT", "checkpoint-14-written-not-marked")
        monkeypatch.setenv("TESSERA_FAULT_ONCE", str(tmp_path / "fired"))
        config, _, trained = run_stage(data, "60ba", RESUME_SETTINGS, eval_data_path=str(data))
        assert (tmp_path / "fired").exists(), "the worker was not killed during the save"
    else:
        stopped: list = []
        watcher = stop_the_worker_after_a_checkpoint(sig, stopped)
        config, _, trained = run_stage(data, "60ba", RESUME_SETTINGS, eval_data_path=str(data))
        watcher.join()
        assert stopped, "the worker finished before it could be stopped"
        steps_per_epoch = -(-prepared.stats.rows // 4)
        assert stopped[0].step % steps_per_epoch != 0  # mid-epoch

    losses = metric(trained.mlflow_run_id, "loss")
    assert len(losses) == 60  # each step once in MLflow's history: none skipped, none logged twice
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-6)
    record = runs.load(config.name)
    events = [e["message"] for e in runs.read_events(config.name)]
    restarts = [m for m in events if "restarting from the checkpoint at step" in m]
    assert len(restarts) == 1, events
    resumed = [m for m in events if m.startswith("resumed from the checkpoint at step")]
    assert len(resumed) == 1 and record.checkpoint_dir in resumed[0]
    if sig == "killed-while-saving":  # step 14's files were on disk without the mark: the one before it counts
        assert resumed[0].startswith("resumed from the checkpoint at step 7 "), resumed
    if sig == signal.SIGTERM:  # the worker saved where it stopped, and the restart continued from there
        assert "stopped by SIGTERM" in restarts[0]
        assert any(m.startswith("stopped by SIGTERM after step") for m in events)
        preempted = [c for c in checkpoints.list_checkpoints(record.checkpoint_dir) if c.reason == "preempted"]
        assert preempted or any("(preempted)" in m for m in events)
    # one MLflow run, with its checkpoints in its artifacts; the last K kept, plus the final one
    client = mlflow_client()
    assert len(client.search_runs([trained.experiment_id], f"tags.`tessera.run_name` = '{config.name}'")) == 1
    kept = checkpoints.list_checkpoints(record.checkpoint_dir)
    assert record.checkpoint_dir.endswith("/artifacts/checkpoints") and trained.mlflow_run_id in record.checkpoint_dir
    assert kept[-1].step == 60 and kept[-1].reason == "final" and len(kept) <= 3 + 1
    assert kept[-1].tokens_seen > 0 and kept[-1].eval_loss is not None
    assert record.estimated_end_time is not None


def test_with_a_remote_artifact_store_a_run_resumes_on_another_host_from_the_checkpoints_copied_there(
        trainer_home, uninterrupted, mlflow_server, monkeypatch, tmp_path):
    """With a tracking server (its artifacts proxied: nothing on this machine), the checkpoints the workers write here
    are copied to the MLflow run's artifacts as they complete. The worker is killed after a checkpoint (no retry: the
    run fails, resumable). On another host (a TESSERA_HOME of its own: no record of the run, no checkpoint, no
    prepared data) fm.resume finds the run in MLflow by its name, prepares the same rows again, downloads the newest
    checkpoint and ends as the uninterrupted run did, in the same MLflow run."""
    from tasks.train.mirror import CheckpointMirror
    from tessera import foundation_model as fm
    from tessera.core import checkpoints, runs
    from tessera.core.errors import ConfigError, TesseraError
    from tessera.core.paths import prepared_dir
    from tessera.core.tracking import mlflow_client
    from tessera.core.weights import resolve_weights

    home, data = trainer_home
    _, reference, _, _ = uninterrupted
    base_config = json.loads((home / "models" / "tiny-chat" / "config.json").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    stopped: list = []
    watcher = stop_the_worker_after_a_checkpoint(signal.SIGKILL, stopped)
    with pytest.raises(TesseraError, match="resumable from step") as failed:
        run_stage(data, "60ba", {**RESUME_SETTINGS, "train_retries": 0}, eval_data_path=str(data))
    watcher.join()
    assert stopped, "the worker finished before it could be stopped"
    name = failed.value.args[0].rsplit("tessera runs resume ", 1)[1].split()[0]
    record = runs.load(name)
    client = mlflow_client()
    artifact_uri = client.get_run(record.run_id).info.artifact_uri
    assert artifact_uri.startswith("mlflow-artifacts:")
    local = checkpoints.list_checkpoints(record.checkpoint_dir)
    there = CheckpointMirror(client, record.run_id, artifact_uri, record.checkpoint_dir).remote_complete()
    assert there == [os.path.basename(c.path) for c in local] and local[-1].step >= stopped[0].step

    other = tmp_path / "other-host"  # the same model and data paths, nothing else of the run
    (other / "models").mkdir(parents=True)
    (other / "models" / "tiny-chat").symlink_to((home / "models" / "tiny-chat").resolve())
    monkeypatch.setenv("TESSERA_HOME", str(other))
    with pytest.raises(TesseraError, match=f"no training run named '{name}x' here .* nor in MLflow at {mlflow_server}"):
        fm.resume(name + "x")
    fm.resume(name)
    deadline = time.time() + 240
    while not (done := fm.get(name)).status.finished:
        assert time.time() < deadline, fm.get_events(name)[-5:]
        time.sleep(0.5)
    events = [e["message"] for e in fm.get_events(name)]
    assert done.status.value == "COMPLETED", (done.details, events)
    assert done.run_id == record.run_id and runs.load(name).config == record.config
    tags = client.get_run(record.run_id).data.tags
    assert tags["tessera.host"] == runs.this_host() and time.time() - float(tags["tessera.heartbeat"]) < 120
    assert f"recorded here from its MLflow run {record.run_id}: it ran on {runs.this_host()}" in events
    here = runs.load(name).checkpoint_dir
    assert here.startswith(str(other))
    resumed = [m for m in events if m.startswith("resumed from the checkpoint at")]
    assert resumed == [f"resumed from the checkpoint at {local[-1].label}, 1 process(es) then, 1 now: "
                       f"{checkpoints.folder(here, local[-1].step)}"], resumed
    assert metric(record.run_id, "loss") == pytest.approx(reference, rel=1e-5, abs=1e-6)  # each step once
    key = client.get_run(record.run_id).data.params["prepared_data.cache_key"]
    assert (prepared_dir() / key / "manifest.json").is_file()  # prepared again here, alike
    # there as here: the kept ones (keep_checkpoints), the final one last; those pruned here are deleted there
    kept = [os.path.basename(c.path) for c in checkpoints.list_checkpoints(here)]
    assert CheckpointMirror(client, record.run_id, artifact_uri, here).remote_complete() == kept
    assert kept[-1] == os.path.basename(checkpoints.folder(here, 60)) and len(kept) < 60 // 7
    with pytest.raises(TesseraError, match=f"run {name} is COMPLETED"):
        fm.resume(name)
    monkeypatch.setenv("TESSERA_HOME", str(home))

    # another run can start from one by its runs:/ URI: downloaded here once, checked like a local one
    uri = f"runs:/{record.run_id}/checkpoints/{kept[-1]}"
    starting = resolve_weights(uri, base_config)
    assert starting.kind == "checkpoint" and starting.path.startswith(str(runs.run_dir(name).parents[1] / "cache"))
    final = checkpoints.list_checkpoints(here)[-1]
    downloaded = checkpoints.CheckpointInfo.model_validate_json((Path(starting.path) / checkpoints.INFO_FILE).read_text())
    assert downloaded.model_dump(exclude={"path"}) == final.model_dump(exclude={"path"})
    assert resolve_weights(uri, base_config).path == starting.path  # reused, not downloaded again
    with pytest.raises(ConfigError, match=f"custom_weights_path runs:/{record.run_id}/checkpoints/step_99999999: could not download"):
        resolve_weights(f"runs:/{record.run_id}/checkpoints/step_99999999", base_config)


def prepare_eval(config):
    from tasks.prepare.stage import prepare

    return prepare(config, config.eval_data_path)


def test_a_run_starts_from_each_form_of_custom_weights(trainer_home, uninterrupted):
    """An earlier run's checkpoint (its folder, or its runs:/ URI), a registered version of it, or its model directory:
    the new run's first loss on the same data is the earlier run's trained loss, not the base model's."""
    from tasks.register import register_model
    from tessera.core import checkpoints, runs
    from tessera.core.tracking import mlflow_client

    _, data = trainer_home
    _, reference, first_config, first = uninterrupted
    final = checkpoints.latest(runs.load(first_config.name).checkpoint_dir)
    forms = {"model directory": first.model_dir, "checkpoint folder": final.path}
    forms["registered version"] = register_model.fn(first_config, first).uri
    # a checkpoint's runs:/ URI (in the run's artifacts) is that very folder
    from tessera.core.weights import resolve_weights

    in_artifacts = resolve_weights(f"runs:/{first.mlflow_run_id}/checkpoints/{Path(final.path).name}", {})
    assert (in_artifacts.kind, in_artifacts.path) == ("checkpoint", final.path)
    base_loss, trained_loss = reference[0], reference[-1]
    assert trained_loss < base_loss / 2
    for form, given in forms.items():
        _, _, second = run_stage(data, "1ba", RESUME_SETTINGS, custom_weights_path=given)
        loss = metric(second.mlflow_run_id, "loss")[0]
        assert abs(loss - trained_loss) < abs(loss - base_loss) / 4, (form, loss, trained_loss, base_loss)
        assert mlflow_client().get_run(second.mlflow_run_id).data.params["custom_weights_path"] == given


def test_custom_weights_are_checked_before_the_run_starts(trainer_home, tiny_model_dir, tmp_path):
    """A missing folder, one that holds no model, and weights of another architecture: one message naming the path,
    before any data is read."""
    import json
    import shutil

    from tessera.core.config import build_run_config
    from tessera.core.errors import ConfigError
    from tessera.core.run_plan import resolve_run

    _, data = trainer_home
    wider = tmp_path / "wider"
    shutil.copytree(tiny_model_dir, wider)
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    (tmp_path / "empty").mkdir()
    expected = {
        str(tmp_path / "missing"): "is not a folder",
        str(tmp_path / "empty"): "holds neither a checkpoint (checkpoint.json) nor a model (config.json)",
        str(wider): f"not the base model's architecture: hidden_size {2 * config['hidden_size']}",
        "runs:/0123456789abcdef/checkpoints/step_00000007": "no MLflow run '0123456789abcdef'",
        "models:/main.nothing.here/1": "not in the MLflow registry",
    }
    for given, message in expected.items():
        run = build_run_config(model="tessera/tiny-chat", train_data_path=str(data), register_to="main.test.weights",
                               custom_weights_path=given)
        with pytest.raises(ConfigError) as refused:
            resolve_run(run)
        assert given in str(refused.value) and message in str(refused.value), str(refused.value)


def test_an_out_of_memory_kill_is_told_by_evidence_and_never_retried():
    """The cgroup's count of out-of-memory kills decides, not the signal alone."""
    from tasks.train.stage import WorkersDied, failure
    from types import SimpleNamespace

    settings = SimpleNamespace(micro_batch_tokens=4096, activation_checkpointing=False, nproc_per_node=2)
    plan = SimpleNamespace(settings=settings, memory=SimpleNamespace(total_bytes=9e9, budget_bytes=8e9), context_length=2048)
    oom = failure(["torchrun: exitcode  : -9"], 1, plan, out_of_memory=True)
    assert not isinstance(oom, WorkersDied)
    message = str(oom)
    assert "out-of-memory killer" in message and "micro_batch_tokens (now 4096)" in message and "\n" not in message
    crash = failure([], -signal.SIGKILL, plan, out_of_memory=False)
    assert isinstance(crash, WorkersDied) and "not by the out-of-memory killer" in str(crash)
    said = failure(["TESSERA_TRAIN_ERROR: could not load the model weights"], 1, plan, out_of_memory=False)
    assert not isinstance(said, WorkersDied) and str(said) == "could not load the model weights"


def test_the_rendezvous_lives_on_node_0_and_its_loss_is_a_lost_node():
    """Node 0's torchrun hosts the rendezvous store, a joined node's never does (on one host either could bind it
    first, and losing it would end node 0's torchrun); a torchrun that lost it anyway tells a lost node."""
    from types import SimpleNamespace

    from tasks.train.nodes import worker_command
    from tasks.train.stage import WorkersDied, failure
    from tessera.core.config import TrainingSettings

    settings = TrainingSettings(nnodes=2, nproc_per_node=1, rdzv_endpoint="127.0.0.1:29400")
    node_0, _ = worker_command("job.json", settings, "run-1")
    joined, _ = worker_command("job.json", settings, "run-1", joining=True)
    assert "--rdzv-conf=is_host=true" in node_0 and "--rdzv-conf=is_host=false" in joined
    torchrun = ["W1206 dynamic_rendezvous.py:1298] The node has failed to shutdown the rendezvous",
                "torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: The connection to the C10d store has failed."]
    lost = failure(torchrun, 1, SimpleNamespace(), out_of_memory=False)
    assert isinstance(lost, WorkersDied) and "lost contact with another" in str(lost) and "C10d store" in str(lost)


def test_a_bad_weights_file_ends_the_stage_with_one_message(trainer_home, tiny_model_dir, tmp_path):
    from tessera.core.errors import TesseraError

    _, data = trainer_home
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TesseraError) as failure:
        run_stage(data, "1ba", {}, custom_weights_path=str(broken))
    message = str(failure.value)
    assert message.startswith(f"could not load the model weights from {broken}")
    assert "\n" not in message


def test_a_model_whose_turns_end_with_another_token_than_eos_learns_to_stop_there(trainer_home, eot_model_dir):
    """The template ends turns with <|end_of_turn|>, not EOS: the fine-tuned model stops at the turn's end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import EOS, EOT
    from tessera.core.generation import generate, prompt_ids

    home, _ = trainer_home
    data = write_jsonl(home / "eot.jsonl", [chat("what is two and two", "it is four"), chat("and four", "two and two")])
    _, _, trained = run_stage(data, "150ep", {"log_every": 50}, model=str(eot_model_dir), learning_rate=1e-2)
    model = AutoModelForCausalLM.from_pretrained(trained.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(trained.model_dir)
    eot, eos = tokenizer.convert_tokens_to_ids([EOT, EOS])
    assert model.generation_config.eos_token_id == [eot, eos]  # saved with the model, for every generator
    assert model.config.use_cache is True
    question = prompt_ids(tokenizer, [{"role": "user", "content": "what is two and two"}])
    [(new, finish)] = generate(model, tokenizer, [question], 40)
    assert (tokenizer.decode(new, skip_special_tokens=True), finish) == ("it is four", "stop")
    assert len(new) < 10  # stopped at the turn's end, well before max_tokens
    # the stage's own check says so: every greedy answer to the data's prompts ended its turn, without repeating
    assert metric(trained.mlflow_run_id, "eval_stop_rate") == [1.0]
    assert metric(trained.mlflow_run_id, "eval_repetition")[0] < 0.2
    assert len(metric(trained.mlflow_run_id, "base_stop_rate")) == 1


def test_a_model_trained_never_to_end_its_turn_gets_a_stop_rate_of_zero(trainer_home, eot_model_dir):
    """Answers cut by the context length teach the model to go on: its greedy answers run to the budget, looping."""
    home, _ = trainer_home
    endless = "one two three four " * 40  # longer than the context: no end-of-turn token is ever trained
    data = write_jsonl(home / "endless.jsonl", [chat("count", endless), chat("count again", endless)])
    _, _, trained = run_stage(data, "150ep", {"log_every": 50}, model=str(eot_model_dir), learning_rate=1e-2)
    assert metric(trained.mlflow_run_id, "eval_stop_rate") == [0.0]
    assert metric(trained.mlflow_run_id, "eval_repetition")[0] > 0.5


def test_the_loop_keeps_collectives_on_its_device_answers_with_one_model_and_replaces_its_output(
    trainer_home, tmp_path, monkeypatch
):
    """The worker's main() in this process (1 rank): every tensor any collective gets is on the loop's device
    (NCCL reduces nothing else); the eval prompts are answered without loading a second model beside the
    training one and its optimizer; a re-executed run replaces its output and never reuses a stale staging folder."""

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tasks.prepare.stage import prepare, row_tokens
    from tasks.train import distributed, worker
    from tasks.train.stage import train_job
    from tessera.core import runs
    from tessera.core.catalog import resolve_model
    from tessera.core.config import build_run_config
    from tessera.core.processes import free_port
    from tessera.core.run_plan import ResolvedRun, plan_run

    _, data = trainer_home
    config = build_run_config(
        model="tessera/tiny-chat", train_data_path=str(data), register_to="main.test.inprocess", context_length=CTX,
        training_duration="3ba", eval_data_path=str(data), eval_prompts=["question 1"],
        training_config={"precision": "fp32", "log_every": 1, "eval_every": 2, "global_batch_tokens": 4 * CTX},
    )
    runs.save(runs.RunRecord(config=config, created_at=runs.now()))
    prepared = prepare(config)
    model = resolve_model(config.model, config.context_length)
    plan = plan_run(config, model, row_tokens(prepared.path), prepared.stats.context_length)
    out = tmp_path / "final_model"
    for stale in (out, tmp_path / "final_model.partial"):  # an earlier execution's output, and a killed one's staging
        stale.mkdir()
        (stale / "stale.txt").write_text("from an earlier execution")
    job = train_job(ResolvedRun(config=config, model=model), plan, prepared, prepared, out, tmp_path / "checkpoints")

    seen: list[torch.device] = []
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (seen.append(t.device), real_all_reduce(t, *a, **k))[1])
    loads: list = []
    real_load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])
    port = free_port()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    pytests_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert worker.main(job) == 0
    finally:
        signal.signal(signal.SIGTERM, pytests_sigterm)

    device = distributed.training_device()
    assert len(seen) >= 3 + 2 and set(seen) == {device}  # a logging window per step, an eval at step 2 and the end
    assert len(loads) == 1  # the training model only
    assert (out / "config.json").exists() and not (out / "stale.txt").exists()
    assert not (tmp_path / "final_model.partial").exists()


def test_scalars_summed_over_ranks_are_built_on_the_given_device(monkeypatch):
    """What the logging window and the evaluation reduce: host numbers and device tensors alike go to the collective
    on the device given, here `meta` (a CPU-only machine has no other), where a tensor built without one lands on the CPU."""
    import torch
    import torch.distributed as dist

    from tasks.train.distributed import sum_over_ranks

    seen: list[torch.device] = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: seen.append(t.device))
    meta = torch.device("meta")
    sum_over_ranks([torch.zeros((), device=meta), 1024], meta)
    assert seen == [meta]
