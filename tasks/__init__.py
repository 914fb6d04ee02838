"""Pipeline stages, one module each. Kept import-free so the training worker can load without Prefect."""

import logging


def stage_logger() -> logging.Logger:
    """Prefect's run logger inside a flow or task run (it reaches the UI), a plain logger elsewhere."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        return get_run_logger()
    except (ImportError, MissingContextError):
        return logging.getLogger("tessera")
