"""The Prefect UI form of every deployed flow: a description for every field, choices for every enumeration."""

import pytest
from prefect.utilities.callables import parameter_schema

from flows.deploy import deploy
from flows.finetune import finetune
from flows.retrain import retrain
from flows.watch import watch_sources


def undescribed(schema) -> list[str]:
    missing = [f for f, spec in schema.properties.items() if not spec.get("description")]
    for name, model in schema.definitions.items():
        missing += [f"{name}.{f}" for f, spec in model.get("properties", {}).items() if not spec.get("description")]
    return missing


@pytest.mark.parametrize("flow", [finetune, retrain, deploy, watch_sources], ids=lambda f: f.name)
def test_every_field_of_the_form_is_described(flow):
    assert not undescribed(parameter_schema(flow))


def test_enumerations_are_dropdowns():
    schema = parameter_schema(finetune)
    assert set(schema.definitions["TaskType"]["enum"]) == {"CHAT_COMPLETION", "INSTRUCTION_FINETUNE", "CONTINUED_PRETRAIN"}
    assert schema.definitions["TrainingSettings"]["properties"]["precision"]["enum"] == ["auto", "fp32", "bf16"]


def test_a_parameter_without_a_description_is_refused():
    from tessera.core.forms import run_flow

    def flow_with_an_undescribed_parameter(extra: int = 0, **run_parameters):
        """A flow."""

    with pytest.raises(TypeError, match="'extra' has no description"):
        run_flow()(flow_with_an_undescribed_parameter)


def test_a_flow_takes_the_run_parameters_by_keyword_with_its_own_in_their_place():
    """The derived signature is the one Prefect binds a call with: run parameters by keyword, a flow's own
    declaration replacing a run parameter's (retrain requires eval_data_path), unknown names refused."""
    import inspect

    from prefect.utilities.callables import parameters_to_args_kwargs

    from tessera.core.forms import run_flow

    @run_flow(eval_data_path="required here", run_name="its name")
    def body(eval_data_path: str, run_name: str | None = None, **run_parameters):
        """A flow body."""
        return eval_data_path, run_name, run_parameters

    sig = inspect.signature(body).parameters
    assert sig["eval_data_path"].default is inspect.Parameter.empty and sig["training_duration"].default == "1ep"
    args, kwargs = parameters_to_args_kwargs(body, {"model": "m", "eval_data_path": "e", "run_name": "r"})
    assert args == () and body(*args, **kwargs) == ("e", "r", {"model": "m"})
    with pytest.raises(Exception, match="nonsense"):
        parameters_to_args_kwargs(body, {"nonsense": 1})
