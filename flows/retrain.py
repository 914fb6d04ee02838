"""The retraining DAG: validate (eval data held out) -> [one at a time per model: plan (idempotent, in order) ->
prepare -> report -> train -> register (@challenger) -> evaluate against @champion -> promote or reject] -> move the
endpoints that follow @champion -> optionally serve @champion behind `serve_to`. Composition only; logic is in tasks/
(tasks/promote/, tasks/serve/stage.py, and the finetune stages)."""

from __future__ import annotations

from prefect import flow, runtime
from prefect.states import Cancelled, State

from tasks.promote import run_record
from tasks.promote.champion import CHAMPION
from tasks.promote.decision import MarginMode, Metric
from tasks.promote.lock import model_lock
from tasks.promote.stage import RetrainResult, plan_retrain, promote_model, require_eval_data, retrain_result
from tasks.serve.stage import deploy_endpoint, update_endpoints
from tasks.prepare.stage import prepare_data
from tasks.register import register_model
from tasks.train.stage import train_model
from tasks.validate import report_data, resolve_inputs
from tessera.core import runs
from tessera.core.forms import run_flow


@flow(
    name="retrain",
    on_running=[run_record.on_running],
    on_completion=[run_record.on_completion],
    on_failure=[run_record.on_failure],
    on_crashed=[run_record.on_failure],
    on_cancellation=[run_record.on_cancellation],
)
@run_flow(
    register_to="catalog.schema.model: every retrain is a new version of this one model",
    eval_data_path="held-out data, the same for every retrain: the new version and the champion are scored on it "
    "(refused when it is the training data: the same path, content or table version)",
    serve_to="a named endpoint to serve @champion behind afterwards (started if new, else updated)",
    metric="what decides, lower is better: eval_loss (mean per trained token) or eval_perplexity; bits per byte "
    "instead when the two models' tokenizers differ",
    promotion_margin="how much better the new version must be: a fraction of the champion's value (relative) or an "
    "amount of the metric (absolute); 0: strictly better",
    margin_mode="relative or absolute",
    source_version="the data's version, for ordering: a volume's observation sequence from the watcher's event (a "
    "table's own Delta version is used when the data is a table); a source older than the champion's is refused",
    force="retrain even when this data and configuration are already registered, or the source is older",
    run_name="the run's name (default: derived from the model and the flow run)",
)
def retrain(
    eval_data_path: str,
    metric: Metric = "eval_loss",
    promotion_margin: float = 0.0,
    margin_mode: MarginMode = "relative",
    source_version: int | None = None,
    force: bool = False,
    run_name: str | None = None,
    **run_parameters,
) -> RetrainResult | State:
    """Retrain `model` on the latest `train_data_path` into the three-part `register_to`, and promote the new version
    to @champion only if it beats the current one on `eval_data_path`. The run's parameters are RunParameters'
    (tessera.core.forms.run_flow: eval_data_path required here), then the gate's own; the form's descriptions come
    from RunParameters, and from the gate's below."""
    parameters = run_record.run_parameters(runtime.flow_run.parameters)
    name = run_name or runs.flow_run_name(runtime.flow_run.parameters, runtime.flow_run.id)
    record = runs.ensure_record(name, parameters)
    if runs.cancelled(record):  # fm.cancel got there before this flow run started: it ends Cancelled, trains nothing
        return Cancelled(message=f"run {name} was cancelled before it started")
    run = resolve_inputs(record)
    config = run.config
    require_eval_data(config)
    with model_lock(config.registered_model_name):
        plan = plan_retrain(config, source_version, force)
        if plan.skip:
            return retrain_result(plan)
        prepared = prepare_data(config)
        eval_prepared = prepare_data(config, config.eval_data_path, prepared.stats.context_length)
        report = report_data(run, prepared)
        trained = train_model(run, prepared, report, eval_prepared)
        registered = register_model(config, trained)
        decision = promote_model(
            run, registered, eval_prepared, plan, metric=metric, margin=promotion_margin, margin_mode=margin_mode
        )
    champion_uri = f"models:/{registered.name}@{CHAMPION}"
    if decision.promote:
        update_endpoints(champion_uri, config.name)
    outcome = retrain_result(plan, decision, registered)
    if config.serve_to and outcome.champion:
        deploy_endpoint(config.serve_to, champion_uri, config.name)
    return outcome
