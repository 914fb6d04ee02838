"""Retraining: the promotion gate (pure logic), idempotence and order, one retrain per model at a time, the retrain
flow for real (promotes a better model, rejects a worse one, ends early when nothing changed, refuses older data),
and the deploy stage at the end of finetune (`serve_to`)."""

from __future__ import annotations

import contextlib
import math
import threading
import time

import pytest

from conftest import chat, write_jsonl
from tasks.promote.champion import current_champion
from tasks.promote.decision import decide
from tasks.promote.lock import model_lock
from tasks.promote.plan import already_registered, config_hash, older_than_champion
from tasks.promote.scoring import Score, base_score, compared, eval_set_for, trained_text_bytes
from tasks.promote.stage import plan_retrain, require_eval_data
from tasks.register import source_tags
from tessera.core.config import TaskType, build_run_config
from tessera.core.errors import ConfigError

TRAIN = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(8)]
EVAL = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(8, 11)]
NAME = "main.retrain.bot"


@pytest.fixture(autouse=True)
def own_mlflow_store(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which tessera.core.paths honours as the user's setting: without
    this, a test after another in one session would use the earlier test's store (and see its models)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# --- the decision, pure ---------------------------------------------------------------------------------------


def test_promotes_only_when_strictly_better_by_the_margin():
    assert decide("models:/m/2", 0.9, "models:/m/1", 1.0).promote
    tie = decide("models:/m/2", 1.0, "models:/m/1", 1.0)
    assert not tie.promote and "is not below 1" in tie.reason  # a tie keeps the champion
    relative = dict(margin=0.2, margin_mode="relative")
    assert not decide("c", 0.85, "i", 1.0, **relative).promote  # needs < 0.8
    assert decide("c", 0.79, "i", 1.0, **relative).promote
    absolute = dict(margin=0.05, margin_mode="absolute")
    assert not decide("c", 0.96, "i", 1.0, **absolute).promote and decide("c", 0.94, "i", 1.0, **absolute).promote
    worse = decide("models:/m/2", 1.5, "models:/m/1", 1.0, metric="eval_perplexity")
    assert (worse.metric, worse.challenger_value, worse.incumbent_value, worse.threshold) == ("eval_perplexity", 1.5, 1.0, 1.0)
    assert worse.reason.startswith("eval_perplexity 1.5 is not below 1 (models:/m/1 1")


def test_a_challenger_that_stops_ending_its_turns_never_wins():
    """A lower loss does not make up for a model that loops: a stop rate more than the margin below the incumbent's
    refuses the challenger; within the margin, or unknown on either side, the loss alone decides."""
    from tasks.promote.decision import STOP_RATE_MARGIN

    looping = decide("models:/m/2", 0.5, "models:/m/1", 1.0, challenger_stop_rate=0.25, incumbent_stop_rate=1.0)
    assert not looping.promote and "end their turn 25% of the time, models:/m/1's 100%" in looping.reason
    within = 1.0 - STOP_RATE_MARGIN
    assert decide("c", 0.5, "i", 1.0, challenger_stop_rate=within, incumbent_stop_rate=1.0).promote
    assert decide("c", 0.5, "i", 1.0, challenger_stop_rate=0.0, incumbent_stop_rate=None).promote


def test_a_value_that_is_not_finite_never_wins_and_bad_margins_are_refused():
    assert not decide("c", math.nan, "i", 1.0).promote and not decide("c", math.inf, "i", 1.0).promote
    for margin, mode in ((-0.1, "relative"), (1.0, "relative"), (math.nan, "absolute")):
        with pytest.raises(ConfigError, match="promotion_margin"):
            decide("c", 0.5, "i", 1.0, margin=margin, margin_mode=mode)
    with pytest.raises(ConfigError, match="margin_mode"):
        decide("c", 0.5, "i", 1.0, margin_mode="percent")


def test_config_hash_covers_what_shapes_the_weights_only():
    base = dict(model="tessera/tiny-chat", train_data_path="main.s.t", register_to="c.s.m", eval_data_path="/Volumes/c/s/v/e.jsonl")
    h = config_hash(build_run_config(**base))
    assert config_hash(build_run_config(**base, name="other", serve_to="bot", validate_inputs=False, experiment_path="/x")) == h
    assert config_hash(build_run_config(**{**base, "train_data_path": "main.s.t@v7"})) == h  # the version is compared apart
    assert config_hash(build_run_config(**base, learning_rate=1e-4)) != h
    assert config_hash(build_run_config(**base, training_config={"seed": 1})) != h
    assert config_hash(build_run_config(**{**base, "eval_data_path": "/Volumes/c/s/v/other.jsonl"})) != h


def test_source_identity_matches_by_tags_and_order_by_source_version():
    assert source_tags({"source.kind": "delta", "source.version": "3", "source.fingerprint": "f"}) == {"train_data_version": "3"}
    assert source_tags({"source.kind": "jsonl", "source.fingerprint": "ab"}) == {"train_data_content_hash": "ab"}
    decided = {"promotion": "rejected"}
    versions = [("3", {"train_data_version": "4", "config_hash": "h", **decided}),
                ("2", {"train_data_version": "3", "config_hash": "h", **decided}),
                ("1", {"train_data_version": "3", "config_hash": "g", **decided})]
    assert already_registered(versions, {"train_data_version": "3"}, "h") == "2"
    assert already_registered(versions, {"train_data_version": "3"}, "x") is None
    assert already_registered(versions, {}, "h") is None
    assert older_than_champion(2, {"source_version": "3"}) == 3
    assert older_than_champion(3, {"source_version": "3"}) is None  # the same data again is not older
    assert older_than_champion(None, {"source_version": "3"}) is None and older_than_champion(1, {}) is None


def test_a_version_without_a_decision_is_not_done():
    """A retrain killed between registering and deciding (an out-of-memory kill while loading the champion, say)
    leaves a version with the configuration's tags but no decision: the next retrain must make one."""
    undecided = [("2", {"train_data_version": "3", "config_hash": "h"})]
    assert already_registered(undecided, {"train_data_version": "3"}, "h") is None
    decided = [("3", {"train_data_version": "3", "config_hash": "h", "promotion": "rejected"}), *undecided]
    assert already_registered(decided, {"train_data_version": "3"}, "h") == "3"


def test_other_tokenizers_are_compared_per_byte_of_the_trained_text():
    """A finer tokenizer spreads the same text over more tokens, each easier to predict: per token it wins
    (0.9 < 2.0) while it predicts the text worse (90 nats in all against 80). Per byte, it loses."""
    fine, coarse = Score(loss_sum=90.0, tokens=100), Score(loss_sum=80.0, tokens=40)
    assert compared("eval_loss", fine, coarse, None) == ("eval_loss", 0.9, 2.0)
    assert compared("eval_perplexity", fine, coarse, None) == ("eval_perplexity", math.exp(0.9), math.exp(2.0))
    metric, mine, theirs = compared("eval_loss", fine, coarse, text_bytes=300)
    assert (metric, mine, theirs) == ("eval_bits_per_byte", 90 / math.log(2) / 300, 80 / math.log(2) / 300)
    assert not decide("c", mine, "i", theirs, metric=metric).promote


def test_the_trained_text_is_what_the_user_wrote_without_markup(home, eot_model_dir):
    """The bytes of a per-byte comparison: assistant turns (or responses) as written, however each tokenizer and
    template splits and wraps them; the scores are the trainer's summed loss over each model's own trained tokens."""
    from tasks.prepare.stage import prepare

    turns = [("what is café?", "a café is a small restaurant"), ("and two plus two?", "four, twice two"), ("hi", "hello")]
    path = write_jsonl(home / "eval.jsonl", [chat(*turns[0], *turns[1]), chat(*turns[2], system="be brief")])
    config = build_run_config(model="tessera/tiny-chat", train_data_path=str(path), register_to=NAME, eval_data_path=str(path))
    assert trained_text_bytes(config, str(path)) == sum(len(a.encode()) for _, a in turns)
    pairs = write_jsonl(home / "pairs.jsonl", [{"prompt": "q", "response": "été"}, {"prompt": "q", "completion": "ok"}])
    instructions = config.model_copy(update={"task_type": TaskType.INSTRUCTION_FINETUNE})
    assert trained_text_bytes(instructions, str(pairs)) == len("été".encode()) + 2

    ours = prepare(config, str(path), 64)
    assert eval_set_for(config, "tessera/tiny-chat", ours) is ours  # the same tokenizer: the same rows
    theirs = eval_set_for(config, str(eot_model_dir), ours)
    assert theirs.cache_key != ours.cache_key and theirs.stats.context_length == 64
    mine = base_score(str(home / "models" / "tiny-chat"), ours)
    other = base_score(str(eot_model_dir), theirs)
    assert (mine.tokens, other.tokens) == (ours.stats.trainable_tokens, theirs.stats.trainable_tokens)
    assert mine.loss_sum > 0 and other.loss_sum > 0 and mine.loss == mine.loss_sum / mine.tokens


def test_plan_orders_tables_by_their_delta_version(home, caplog):
    """A table's own version orders it (a source_version given with it is overruled); older than the champion's is
    refused unless forced; the same data and configuration as a registered version ends early."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from tessera.core import runs
    from tessera.core.run_plan import resolve_run
    from tessera.core.tracking import mlflow_client

    location = str(home / "warehouse" / "main" / "sales" / "chats")
    write_deltalake(location, pa.Table.from_pylist(TRAIN[:4]))
    write_deltalake(location, pa.Table.from_pylist(TRAIN[4:]), mode="append")  # version 1
    config = resolve_run(build_run_config(model="tessera/tiny-chat", train_data_path="main.sales.chats", register_to=NAME)).config
    assert config.train_data_path == "main.sales.chats@v1"
    runs.save(runs.RunRecord(config=config, created_at=runs.now()))
    client = mlflow_client()
    client.create_registered_model(NAME)
    champion = client.create_model_version(NAME, source=str(home / "nowhere"))
    client.set_model_version_tag(NAME, champion.version, "source_version", "5")
    client.set_registered_model_alias(NAME, "champion", champion.version)

    refused = plan_retrain.fn(config, source_version=9)
    assert refused.skip == "older_source" and refused.source_version == 1 and refused.champion == f"models:/{NAME}/1"
    assert "source version 1 of main.sales.chats@v1 is older than the champion's (5" in refused.message
    assert "ordering by the version read" in caplog.text
    assert runs.load(config.name).details == refused.message
    assert plan_retrain.fn(config, force=True).skip is None

    client.set_model_version_tag(NAME, champion.version, "source_version", "1")
    for key, value in {"train_data_version": "1", "config_hash": config_hash(config), "promotion": "promoted"}.items():
        client.set_model_version_tag(NAME, champion.version, key, value)
    again = plan_retrain.fn(config)
    assert again.skip == "idempotent" and again.existing == f"models:/{NAME}/1"
    assert "already registered as models:/main.retrain.bot/1; force=True retrains anyway" in again.message
    assert plan_retrain.fn(config, force=True).skip is None
    assert plan_retrain.fn(config.model_copy(update={"learning_rate": 1e-4})).skip is None


def test_eval_data_that_is_the_training_data_is_refused_naming_eval_data_path(home):
    """The same path, the same content under another path, or the same Delta table at the same version: the gate
    would reward memorizing. Another version of the table is other data (the data report counts what they share)."""
    import shutil

    import pyarrow as pa
    from deltalake import write_deltalake

    train = write_jsonl(home / "volumes" / "main" / "default" / "raw" / "train.jsonl", TRAIN)
    shutil.copy(train, home / "copy.jsonl")
    location = str(home / "warehouse" / "main" / "sales" / "chats")
    write_deltalake(location, pa.Table.from_pylist(TRAIN[:4]))
    write_deltalake(location, pa.Table.from_pylist(TRAIN[4:]), mode="append")  # version 1, the latest
    run = dict(model="tessera/tiny-chat", register_to=NAME)
    for data, held in (("/Volumes/main/default/raw/train.jsonl", "/Volumes/main/default/raw/train.jsonl"),
                       ("/Volumes/main/default/raw/train.jsonl", str(home / "copy.jsonl")),
                       ("main.sales.chats", "main.sales.chats@v1")):
        with pytest.raises(ConfigError, match=f"^eval_data_path {held} is the training data"):
            require_eval_data(build_run_config(**run, train_data_path=data, eval_data_path=held))
    require_eval_data(build_run_config(**run, train_data_path="main.sales.chats", eval_data_path="main.sales.chats@v0"))
    assert not (home / "prepared").exists()


# --- one retrain per model at a time ---------------------------------------------------------------------------


@pytest.mark.slow
def test_the_model_lock_holds_one_model_and_lets_others_through(home):
    from prefect.client.orchestration import get_client

    from tessera.core.paths import apply_engine_defaults

    apply_engine_defaults()  # Prefect's home in TESSERA_HOME, and time enough for its ephemeral server to start
    held, release = threading.Event(), threading.Event()

    def holder():
        with model_lock("main.s.a"):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(180)
        with get_client(sync_client=True) as client:  # the Prefect limit itself is taken
            assert client.read_global_concurrency_limit_by_name("tessera-model-main.s.a").active_slots == 1
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            with model_lock("main.s.a", timeout_seconds=2):
                pass
        assert time.monotonic() - started < 30
        with model_lock("main.s.b", timeout_seconds=5):  # another model does not wait
            pass
    finally:
        release.set()
        thread.join(60)
    with model_lock("main.s.a", timeout_seconds=10):  # released when the holder left
        pass
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("tessera-model-main.s.a")
    assert (limit.limit, limit.active_slots) == (1, 0)


@pytest.mark.slow
def test_a_holder_killed_with_sigkill_does_not_keep_the_model_locked(home):
    """On the ephemeral API (a killed process's lease dies with its temporary server, and no repossessor runs), the
    next run of the model gets the slot at once. Both in processes of their own: each reads PREFECT_HOME at start."""
    import os
    import signal
    import subprocess
    import sys

    ephemeral = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # not the session's server
    holder = ("import time\nfrom tasks.promote.lock import model_lock\nwith model_lock('main.s.k'):\n"
              "    print('held', flush=True)\n    time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env=ephemeral)
    try:
        assert proc.stdout.readline().strip() == "held"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the holder and its temporary Prefect server, no clean-up of any kind
        proc.wait()
    nxt = ("import logging, time\nlogging.basicConfig(level=logging.WARNING)\nfrom tasks.promote.lock import model_lock\n"
           "from prefect import get_client\nt = time.monotonic()\nwith model_lock('main.s.k', timeout_seconds=20):\n"
           "    waited = time.monotonic() - t\n"
           "    with get_client(sync_client=True) as c:\n"
           "        print('acquired', round(waited, 1), c.read_global_concurrency_limit_by_name('tessera-model-main.s.k').active_slots)\n")
    done = subprocess.run([sys.executable, "-c", nxt], capture_output=True, text=True, timeout=180, env=ephemeral)
    assert done.returncode == 0, done.stderr[-3000:]
    word, waited, slots = done.stdout.split()
    assert word == "acquired" and float(waited) < 20 and slots == "1"  # its own slot, the dead holder's given back
    assert "tessera-model-main.s.k: 1 slot(s) left taken by a run that died; reclaimed" in done.stderr


# --- the retrain flow for real ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_retrain_promotes_a_better_model_refuses_a_worse_one_and_keeps_order(home, monkeypatch):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.retrain import retrain
    from tasks.serve import endpoints
    from tessera import foundation_model as fm
    from tessera.core import runs
    from tessera.core.paths import apply_engine_defaults
    from tessera.core.tracking import mlflow_client

    apply_engine_defaults()
    write_jsonl(home / "volumes" / "main" / "default" / "raw" / "train.jsonl", TRAIN)
    write_jsonl(home / "volumes" / "main" / "default" / "raw" / "eval.jsonl", EVAL)
    common = dict(model="tessera/tiny-chat", train_data_path="/Volumes/main/default/raw/train.jsonl",
                  eval_data_path="/Volumes/main/default/raw/eval.jsonl", register_to=NAME)
    worse = dict(training_duration="1ba", learning_rate=1e-9)
    client = mlflow_client()

    def killed_at(point: str, **run):
        """The run ended by the test-only fault hook at `point` (SystemExit, as a kill ends the process there)."""
        with monkeypatch.context() as patch, pytest.raises(SystemExit):
            patch.setenv("TESSERA_FAULT", point)
            retrain(**common, **run)

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        # evaluating on the training data: refused before anything is prepared, naming the parameter
        with pytest.raises(ConfigError, match="^eval_data_path /Volumes/main/default/raw/train.jsonl is the training data"):
            retrain(**{**common, "eval_data_path": common["train_data_path"]}, run_name="memorize")
        assert not (home / "prepared").exists()

        # killed after deciding to promote, just before @champion moves: no version says promoted, none is done
        killed_at("before-champion-alias", training_duration="20ba", source_version=2, run_name="killed")
        assert client.get_model_version(NAME, "1").tags.get("promotion") is None
        assert current_champion(client, NAME) is None

        # no champion yet: the first version must beat the base model; the killed one's data is retrained
        first = retrain(**common, training_duration="20ba", source_version=2, run_name="first")
        assert first.outcome == "promoted" and first.version == f"models:/{NAME}/2" and first.champion == first.version
        assert first.decision.incumbent == "base model tessera/tiny-chat"
        assert first.decision.challenger_value < first.decision.incumbent_value
        won = client.get_model_version(NAME, "2").tags
        assert won["promotion"] == "promoted" and won["source_version"] == "2" and won["config_hash"]
        assert won["train_data_content_hash"] and won["compared_with"] == "base model tessera/tiny-chat"
        assert (won["promotion_metric"], won["promotion_measure"]) == ("eval_loss", "per token")  # one tokenizer

        # no champion either, but started from the last checkpoint of "first": that checkpoint is what the new version
        # must beat, scored as "first"'s own version was (the same weights), not the base model
        start = fm.get_checkpoints("first")[-1]
        from_checkpoint = retrain(**{**common, "register_to": NAME + "_from_checkpoint"}, **worse, source_version=2,
                                  custom_weights_path=start.path, run_name="from-checkpoint")
        assert from_checkpoint.decision.incumbent == f"base model {start.path}"
        assert from_checkpoint.decision.incumbent_value == pytest.approx(first.decision.challenger_value, rel=1e-4)

        # killed while scoring the champion (an out-of-memory kill, say): the next retrain of that data decides
        killed_at("before-incumbent", **worse, source_version=2, run_name="killed-scoring")

        # barely trained: worse than the champion on the same eval set -> rejected, told why, champion kept;
        # serve_to puts @champion (still version 2) behind an endpoint that follows the alias
        try:
            second = retrain(**common, **worse, source_version=2, serve_to="bot", run_name="second")
            served = endpoints.get("bot")
            assert served.status is endpoints.EndpointStatus.READY, served.details
            assert (served.model_uri, served.follow, served.version) == (f"models:/{NAME}@champion", True, "2")
        finally:
            with contextlib.suppress(Exception):
                endpoints.stop("bot")
        assert second.outcome == "rejected" and second.version == f"models:/{NAME}/4"
        assert second.champion == f"models:/{NAME}/2"
        lost = client.get_model_version(NAME, "4").tags
        assert lost["promotion"] == "rejected" and lost["compared_with"] == f"models:/{NAME}/2"
        assert float(lost["challenger_eval_loss"]) > float(lost["incumbent_eval_loss"])
        assert lost["promotion_reason"].startswith(f"eval_loss {lost['challenger_eval_loss']} is not below ")
        assert float(lost["incumbent_eval_loss"]) == pytest.approx(first.decision.challenger_value, rel=1e-4)
        assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
        assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "4"
        assert "rejected" in runs.load("second").details

        # the same data and configuration again: ends early, nothing registered
        started = time.monotonic()
        again = retrain(**common, **worse, source_version=2, run_name="again")
        assert again.outcome == "skipped" and again.version == f"models:/{NAME}/4", again
        assert "already registered as models:/main.retrain.bot/4" in again.message
        assert time.monotonic() - started < 30

        # data older than the champion's: refused before training
        older = retrain(**common, training_duration="2ba", source_version=1, run_name="older")
        assert older.outcome == "refused" and "older than the champion's (2" in older.message
    assert {str(v.version) for v in client.search_model_versions(f"name='{NAME}'")} == {"1", "2", "3", "4"}  # force: test_plan_...
    assert runs.load("first").status.value == "COMPLETED" and runs.load("again").status.value == "COMPLETED"


# --- the deploy stage --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_with_serve_to_ends_with_the_endpoint_serving_the_new_version(home):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.finetune import finetune
    from tasks.serve import endpoints
    from tessera.core.paths import apply_engine_defaults

    apply_engine_defaults()
    write_jsonl(home / "volumes" / "main" / "default" / "raw" / "train.jsonl", TRAIN)
    try:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            uri = finetune(model="tessera/tiny-chat", train_data_path="/Volumes/main/default/raw/train.jsonl",
                           register_to="main.serve.bot", training_duration="2ba", serve_to="bot", run_name="served")
        assert uri == "models:/main.serve.bot/1"
        record = endpoints.get("bot")
        assert record.status is endpoints.EndpointStatus.READY, record.details
        assert (record.model_uri, record.version, record.follow) == ("models:/main.serve.bot/1", "1", False)
        assert endpoints.check_generation(record.local_url, timeout=60)
    finally:
        try:
            endpoints.stop("bot")
        except Exception:
            pass
