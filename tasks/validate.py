"""Stage: validate. Checks every record against the task's rules before anything is tokenized or trained."""

from __future__ import annotations

from prefect import task

from tessera.catalog import resolve_model
from tessera.config import RunConfig
from tessera.records import supports_system_role, valid_records


def validate(config: RunConfig) -> int:
    """Number of valid training examples; raises DataValidationError listing every bad record."""
    from transformers import AutoTokenizer

    model = resolve_model(config.model, config.context_length)
    allow_system = supports_system_role(AutoTokenizer.from_pretrained(model.path))
    count = 0
    for path in filter(None, [config.train_data_path, config.eval_data_path]):
        count += sum(1 for _ in valid_records(path, config.task_type, allow_system))
    return count


validate_data = task(validate, name="validate-data")
