"""`from tessera import foundation_model as fm`: the managed service's SDK names, self-hosted."""

from tessera.sdk import TrainingRun, cancel, create, get, get_events, get_models, list, validate_data  # noqa: A004

__all__ = ["TrainingRun", "cancel", "create", "get", "get_events", "get_models", "list", "validate_data"]
