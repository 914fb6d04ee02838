"""The train stage for real: plan_run, torchrun and its worker processes (gloo on CPU), an MLflow store.

Pins the loss for batch splits: 1 process x 1 micro-batch of 8 rows, 1 process x 4 micro-batches of 2,
and 2 processes x 1 micro-batch of 4 all train the same steps and give the same loss curve. A worker
killed with SIGKILL (what the OOM killer does) and a bad weights file each end in one message.
"""

from __future__ import annotations

import os
import signal
import threading
import time

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


def test_batch_splits_and_processes_give_the_same_losses(trainer_home):
    _, data = trainer_home
    batch = {"global_batch_tokens": 8 * CTX}
    _, prepared, whole = run_stage(data, "1ep", {**batch, "micro_batch_tokens": 8 * CTX})
    # activation checkpointing recomputes the same forward: it changes memory, not the losses
    _, _, accumulated = run_stage(data, "1ep", {**batch, "micro_batch_tokens": 2 * CTX, "activation_checkpointing": True})
    _, _, two_procs = run_stage(data, "1ep", {**batch, "micro_batch_tokens": 4 * CTX, "nproc_per_node": 2})

    rows = prepared.stats.rows
    assert rows >= 16, "the test needs several steps"
    steps = -(-rows // 8)  # 1ep: every row once, the last step smaller
    reference = metric(whole.mlflow_run_id, "loss")
    assert len(reference) == steps
    assert reference[-1] < reference[0]
    for other in (accumulated, two_procs):
        assert metric(other.mlflow_run_id, "loss") == pytest.approx(reference, rel=2e-4)


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


def test_a_killed_worker_ends_the_stage_with_one_message(trainer_home):
    from tessera.core.errors import TesseraError

    _, data = trainer_home
    killed: list[int] = []

    def kill_the_worker():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for p in psutil.Process().children(recursive=True):
                try:
                    if "tasks.train.worker" in " ".join(p.cmdline()) and "torch.distributed.run" not in " ".join(p.cmdline()):
                        time.sleep(3)  # let it start training
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append(p.pid)
                        return
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_worker)
    killer.start()
    with pytest.raises(TesseraError) as failure:
        run_stage(data, "2000ba", {"global_batch_tokens": CTX})
    killer.join()
    assert killed
    message = str(failure.value)
    assert "killed (SIGKILL)" in message and "out-of-memory" in message
    assert "micro_batch_tokens" in message and "activation_checkpointing" in message
    assert "Traceback" not in message and "\n" not in message


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
    new, finish = generate(model, tokenizer, prompt_ids(tokenizer, [{"role": "user", "content": "what is two and two"}]), 40)
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
    from tessera.core.run_plan import plan_run

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
    job = train_job(config, model, plan, prepared, prepared, out)

    seen: list[torch.device] = []
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (seen.append(t.device), real_all_reduce(t, *a, **k))[1])
    loads: list = []
    real_load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])
    port = free_port()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    worker.main(job)

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
