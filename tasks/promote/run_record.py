"""The retrain's run record: the flow's state hooks (tessera.core.runs'), given only the run's own parameters, not
the gate's."""

from __future__ import annotations

from tessera.core import runs
from tessera.core.config import RunParameters


def run_parameters(parameters: dict) -> dict:
    """The retrain flow's parameters that are a run's (RunParameters), for its run record."""
    return {k: v for k, v in parameters.items() if k in RunParameters.model_fields}


def _as_run(flow_run):
    keep = {k: v for k, v in flow_run.parameters.items() if k in RunParameters.model_fields or k == "run_name"}
    return flow_run.model_copy(update={"parameters": keep})


def on_running(flow, flow_run, state) -> None:
    runs.on_running(flow, _as_run(flow_run), state)


def on_completion(flow, flow_run, state) -> None:
    runs.on_completion(flow, _as_run(flow_run), state)


def on_failure(flow, flow_run, state) -> None:
    runs.on_failure(flow, _as_run(flow_run), state)


def on_cancellation(flow, flow_run, state) -> None:
    runs.on_cancellation(flow, _as_run(flow_run), state)
