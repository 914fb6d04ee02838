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
    from pydantic import BaseModel

    from tessera.core.forms import described

    class Known(BaseModel):
        a: int

    with pytest.raises(TypeError, match="'b' has no description"):
        described(Known, a="the a")(lambda a, b: None)
