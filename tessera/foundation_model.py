"""`from tessera import foundation_model as fm`: the managed service's SDK names, self-hosted."""

from tessera.sdk import (  # noqa: A004
    TrainingRun, cancel, create, get, get_checkpoints, get_events, get_models, list, resume, validate_data,
)

__all__ = [
    "TrainingRun", "cancel", "create", "get", "get_checkpoints", "get_events", "get_models", "list", "resume", "validate_data",
]
