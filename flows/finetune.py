"""The fine-tuning DAG: validate inputs -> prepare (records checked, tokenized, packed) -> report -> train -> register
(-> deploy: the new version behind the `serve_to` endpoint, when set).
Composition only; logic is in tasks/."""

from __future__ import annotations

from prefect import flow, runtime
from prefect.states import Cancelled, Failed, State

from tasks.serve.stage import deploy_endpoint
from tasks.prepare.stage import prepare_data
from tasks.register import register_model
from tasks.train.stage import train_model
from tasks.validate import report_data, resolve_inputs
from tessera.core import runs
from tessera.core.forms import run_flow


@flow(
    name="finetune",
    on_running=[runs.on_running],
    on_completion=[runs.on_completion],
    on_failure=[runs.on_failure],
    on_crashed=[runs.on_failure],
    on_cancellation=[runs.on_cancellation],
)
@run_flow(run_name="the run's name (default: made from the model's, unique)")
def finetune(run_name: str | None = None, **run_parameters) -> str | State:
    """Fine-tune `model` on `train_data_path` and register it to `register_to`; returns the model URI.
    The parameters are tessera.core.config.RunParameters' (tessera.core.forms.run_flow), and the run's name."""
    name = run_name or runs.flow_run_name(runtime.flow_run.parameters, runtime.flow_run.id)
    record = runs.ensure_record(name, runtime.flow_run.parameters)
    if runs.cancelled(record):  # fm.cancel got there before this flow run started: it ends Cancelled, trains nothing
        return Cancelled(message=f"run {name} was cancelled before it started")
    if crashed := runs.crashed_too_often(record, runtime.flow_run.run_count):  # rescheduled by automations.yaml
        return Failed(message=crashed)
    run = resolve_inputs(record)
    config = run.config
    prepared = prepare_data(config)
    eval_prepared = prepare_data(config, config.eval_data_path, prepared.stats.context_length) if config.eval_data_path else None
    report = report_data(run, prepared)
    trained = train_model(run, prepared, report, eval_prepared)
    registered = register_model(config, trained)
    if config.serve_to:
        deploy_endpoint(config.serve_to, registered.uri, config.name)
    return registered.uri
