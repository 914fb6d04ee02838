import pytest

from tessera.core.config import build_run_config, parse_duration, parse_register_to
from tessera.core.errors import TesseraError


@pytest.mark.parametrize(
    "text,value,unit",
    [("1ep", 1, "ep"), ("3ep", 3, "ep"), ("500ba", 500, "ba"), ("1_000_000tok", 1_000_000, "tok"), (" 20tok ", 20, "tok")],
)
def test_durations_parse(text, value, unit):
    d = parse_duration(text)
    assert (d.value, d.unit) == (value, unit)


@pytest.mark.parametrize("text", ["", "ep", "3", "3 epochs", "0ep", "-1ba", "1.5ep", "1__000tok", "1000_tok", "_1ep", "3EP"])
def test_malformed_durations_are_refused(text):
    with pytest.raises(TesseraError, match="training_duration"):
        parse_duration(text)


def test_register_to_two_levels_names_the_model_after_the_run():
    assert parse_register_to("main.finetuning", "llama-abc123") == "main.finetuning.llama-abc123"
    assert parse_register_to("main.finetuning.support_bot", "run") == "main.finetuning.support_bot"


@pytest.mark.parametrize("text", ["main", "a.b.c.d", "main..x", "main.sch ema", ".a.b"])
def test_bad_register_to_is_refused(text):
    with pytest.raises(TesseraError, match="register_to"):
        parse_register_to(text, "run")


def test_run_config_refuses_bad_fields_with_their_names():
    base = dict(model="tessera/tiny-chat", train_data_path="/tmp/x.jsonl", register_to="a.b")
    with pytest.raises(TesseraError, match="training_duration"):
        build_run_config(**base, training_duration="forever")
    with pytest.raises(TesseraError, match="context_length"):
        build_run_config(**base, context_length=0)
    with pytest.raises(TesseraError, match="task_type"):
        build_run_config(**base, task_type="SUMMARIZE")
    with pytest.raises(TesseraError, match="register_to"):
        build_run_config(**{**base, "register_to": "only_one"})


def test_run_config_defaults_match_the_managed_service():
    config = build_run_config(model="tessera/tiny-chat", train_data_path="/tmp/x.jsonl", register_to="a.b")
    assert config.task_type.value == "CHAT_COMPLETION"
    assert config.training_duration == "1ep"
    assert config.validate_inputs is True
    assert config.registered_model_name == f"a.b.{config.name}"


def test_launch_settings_that_cannot_work_are_refused_before_anything_runs():
    base = dict(model="tessera/tiny-chat", train_data_path="/tmp/x.jsonl", register_to="a.b")
    with pytest.raises(TesseraError, match="nnodes 2: rdzv_endpoint is required"):
        build_run_config(**base, training_config={"nnodes": 2})
    with pytest.raises(TesseraError, match="rdzv_endpoint 'node0': expected host:port"):
        build_run_config(**base, training_config={"nnodes": 2, "rdzv_endpoint": "node0"})
    with pytest.raises(TesseraError, match="launcher spark: the run needs data_prep_cluster_id"):
        build_run_config(**base, training_config={"launcher": "spark"})
    with pytest.raises(TesseraError, match="with launcher spark, the Spark cluster places the processes"):
        build_run_config(**base, data_prep_cluster_id="local[2]",
                         training_config={"launcher": "spark", "nnodes": 2, "rdzv_endpoint": "n0:29400"})
    two = build_run_config(**base, training_config={"nnodes": 2, "rdzv_endpoint": "node0.cluster:29400"})
    assert (two.training_config.nnodes, two.training_config.rdzv_endpoint) == (2, "node0.cluster:29400")
