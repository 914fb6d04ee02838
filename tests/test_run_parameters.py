"""One definition of a run: the SDK, the CLI, the flow and the worker's job take what RunParameters defines."""

from __future__ import annotations

import inspect

import pytest

from tessera.core.config import RunParameters, TrainingSettings, build_run_config
from tessera.core.errors import ConfigError


def test_sdk_and_every_flow_of_a_run_take_exactly_the_run_parameters_with_their_defaults():
    """The SDK and each flow that runs a training take RunParameters' fields with its defaults, plus their own extras
    (retrain requires eval_data_path: its gate scores on it), and the Prefect form describes each as RunParameters
    does unless the flow says what it means there."""
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune
    from flows.retrain import retrain
    from tessera import sdk

    retrain_extras = {"metric", "promotion_margin", "margin_mode", "source_version", "force", "run_name"}
    for fn, extra, required in ((sdk.create, set(), set()), (finetune.fn, {"run_name"}, set()),
                                (retrain.fn, retrain_extras, {"eval_data_path"})):
        sig = inspect.signature(fn).parameters
        assert set(sig) - extra == set(RunParameters.model_fields), fn
        for name, field in RunParameters.model_fields.items():
            if name == "training_config" or field.is_required():
                continue
            expected = inspect.Parameter.empty if name in required else field.default
            assert sig[name].default == expected, (fn, name)
    form = parameter_schema(retrain).properties
    for name in ("model", "train_data_path", "training_duration", "context_length", "learning_rate"):
        assert form[name]["description"] == " ".join(RunParameters.model_fields[name].description.split()), name


def test_cli_create_has_an_option_for_every_run_parameter():
    from tessera.cli import build_parser

    create = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "create")[1]
    dests = {a.dest for a in create._actions}
    assert set(RunParameters.model_fields) - {"training_config"} <= dests


def test_worker_job_carries_resolved_training_settings():
    from tessera.core.training import TrainJob

    assert TrainJob.model_fields["settings"].annotation is TrainingSettings


def test_training_config_from_a_dict_or_a_yaml_file(tmp_path):
    as_dict = build_run_config(model="m", train_data_path="d", register_to="c.s.m", training_config={"micro_batch_tokens": 2048})
    assert as_dict.training_config.micro_batch_tokens == 2048
    path = tmp_path / "train.yaml"
    path.write_text("training_config:\n  nproc_per_node: 2\n  activation_checkpointing: true\n")
    from_yaml = build_run_config(model="m", train_data_path="d", register_to="c.s.m", training_config=str(path))
    assert from_yaml.training_config.nproc_per_node == 2 and from_yaml.training_config.activation_checkpointing is True


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"micro_batch_tokenz": 1}, "training_config.micro_batch_tokenz: unknown key"),
        ({"micro_batch_tokens": 0}, "training_config.micro_batch_tokens: Input should be greater than 0"),
        ({"precision": "fp16"}, "training_config.precision: Input should be 'auto', 'fp32' or 'bf16'"),
    ],
)
def test_bad_training_settings_are_refused_naming_the_key(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_run_config(model="m", train_data_path="d", register_to="c.s.m", training_config=settings)


def test_cli_config_file_then_set(tmp_path, capsys):
    from tessera.cli import build_parser, main, run_parameters

    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        "model: tessera/tiny-chat\ntrain_data_path: /Volumes/main/default/raw/chat.jsonl\nregister_to: main.demo.m\n"
        "training_duration: 2ep\ntraining_config:\n  micro_batch_tokens: 1024\n  seed: 7\n"
    )
    args = build_parser().parse_args(
        ["create", "--config", str(run_yaml), "--set", "micro_batch_tokens=2048", "--set", "learning_rate=1e-4", "--training-duration", "3ep"]
    )
    params = run_parameters(args)
    config = build_run_config(**params)
    assert config.training_config.micro_batch_tokens == 2048 and config.training_config.seed == 7
    assert config.learning_rate == 1e-4 and config.training_duration == "3ep"

    assert main(["create", "--config", str(run_yaml), "--set", "micro_batch_tokenz=2048"]) == 2
    err = capsys.readouterr().err
    assert "micro_batch_tokenz" in err and "unknown key" in err and "Traceback" not in err
