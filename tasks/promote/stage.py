"""Stage: evaluate and promote. The Prefect tasks the retrain flow calls: `plan_retrain` (idempotent, in order: end
early or refuse before anything is prepared) and `promote_model` (score both models, decide, record the decision and
move @champion); the check that the eval data is held out, and the retrain's result."""

from __future__ import annotations

import re
from typing import Literal

from prefect import task
from pydantic import BaseModel

from tasks import stage_logger
from tasks.prepare.stage import PreparedData, lineage
from tasks.promote.champion import CHAMPION, current_champion, record_on_version
from tasks.promote.decision import Decision, decide
from tessera.core.faults import fault_point
from tasks.promote.plan import RetrainPlan, already_registered, config_hash, older_than_champion
from tasks.promote.scoring import base_score, compared, eval_set_for, registered_score, trained_text_bytes
from tasks.register import RegisteredVersion, source_tags
from tasks.validate import eval_is_training_data
from tessera.core import registry, runs
from tessera.core.config import RunConfig
from tessera.core.errors import ConfigError, TesseraError
from tessera.core.run_plan import ResolvedRun
from tessera.core.tracking import mlflow_client
from tessera.core.weights import load_sources


def require_eval_data(config: RunConfig) -> None:
    """Held-out eval data, checked before anything is prepared: a gate scored on training data rewards memorizing."""
    if not config.eval_data_path:
        raise TesseraError("retrain needs eval_data_path: the new version and the champion are compared on it")
    if how := eval_is_training_data(config):
        raise ConfigError(
            f"eval_data_path {config.eval_data_path} is the training data ({how}): a version would win the promotion "
            "by memorizing it; give held-out records that are not in train_data_path"
        )


@task(name="plan-retrain")
def plan_retrain(config: RunConfig, source_version: int | None = None, force: bool = False) -> RetrainPlan:
    """What this retrain would read and with which configuration; `skip` says why it ends here: that data and
    configuration are already registered and decided (idempotent), or the data is older than the champion's."""
    from tessera.core.sources import resolve_source

    log = stage_logger()
    source = resolve_source(config.train_data_path, config.task_type, cluster=config.data_prep_cluster_id)
    identity = source_tags(lineage(source, {"data": source.fingerprint()}))
    if source.kind == "delta":
        if source_version is not None and source_version != source.version:
            log.warning("source_version %s given, but %s was read at version %s: ordering by the version read",
                        source_version, config.train_data_path, source.version)
        source_version = int(source.version)
    name = config.registered_model_name
    client = mlflow_client()
    champion = current_champion(client, name)
    result = RetrainPlan(
        registered_model=name, config_hash=config_hash(config), source_tags=identity, source_version=source_version,
        champion=f"models:/{name}/{champion.version}" if champion else None,
    )
    registered = [(str(v.version), dict(v.tags)) for v in registry.versions(client, name)]
    existing = already_registered(registered, identity, result.config_hash)
    older = older_than_champion(source_version, dict(champion.tags) if champion else None)
    data = f"{source.display} ({', '.join(f'{k} {v[:12]}' for k, v in identity.items()) or 'no version'})"
    if existing and not force:
        result.skip, result.existing = "idempotent", f"models:/{name}/{existing}"
        result.message = (f"nothing to do: {data} with this configuration (config_hash {result.config_hash}) is already "
                          f"registered as {result.existing}; force=True retrains anyway")
    elif older is not None and not force:
        result.skip = "older_source"
        result.message = (f"refused: source version {source_version} of {config.train_data_path} is older than the "
                          f"champion's ({older}, {result.champion}); force=True retrains anyway")
    else:
        result.message = f"retraining {name} on {data}" + (" (forced)" if force and (existing or older is not None) else "")
    (log.warning if result.skip else log.info)(result.message)
    runs.append_event(config.name, "retrain", result.message)
    if result.skip:
        runs.update(config.name, details=result.message)
    return result


@task(name="evaluate-and-promote")
def promote_model(
    run: ResolvedRun, registered: RegisteredVersion, eval_prepared: PreparedData, retrain: RetrainPlan, *,
    metric: str = "eval_loss", margin: float = 0.0, margin_mode: str = "relative",
) -> Decision:
    """Score the new version and the incumbent on the same pinned eval set, decide, then record the decision on the
    new version and move @champion (record_on_version). Records it as a table artifact and an event too. With no
    champion yet, the incumbent is the model the run started from: the base model, or its custom weights."""
    config = run.config
    log = stage_logger()
    client = mlflow_client()
    name = registered.name
    champion = current_champion(client, name)
    challenger = registered_score(registered.uri, eval_prepared)
    # the stop rates each model's train stage logged: the challenger's, and the champion's own or the base model's
    # (measured by the challenger's run before its first step)
    challenger_run = client.get_model_version(name, registered.version).run_id
    fault_point("before-incumbent")
    if champion is not None and str(champion.version) != registered.version:
        incumbent = f"models:/{name}/{champion.version}"
        theirs = eval_set_for(config, champion.tags.get("base_model") or config.model, eval_prepared)
        incumbent_score = registered_score(incumbent, theirs)
        incumbent_label = f"{incumbent} (@{CHAMPION})"
        incumbent_stops = logged_metric(client, champion.run_id, "eval_stop_rate")
    else:
        folder, checkpoint = load_sources(run.weights, run.model.path)
        theirs, incumbent_score = eval_prepared, base_score(folder, eval_prepared, checkpoint)
        incumbent = incumbent_label = f"base model {config.custom_weights_path or config.model}"
        incumbent_stops = logged_metric(client, challenger_run, "base_stop_rate")
    # the same rows (cache key) mean the same tokens: per token; else per byte of the text both were scored on
    same_tokens = theirs.cache_key == eval_prepared.cache_key
    text_bytes = None if same_tokens else trained_text_bytes(config, config.eval_data_path)
    measure, challenger_value, incumbent_value = compared(metric, challenger, incumbent_score, text_bytes)
    decision = decide(
        registered.uri, challenger_value, incumbent_label, incumbent_value,
        metric=measure, margin=margin, margin_mode=margin_mode,
        challenger_stop_rate=logged_metric(client, challenger_run, "eval_stop_rate"),
        incumbent_stop_rate=incumbent_stops,
    )
    decision = decision.model_copy(update={"incumbent": incumbent})
    record_on_version(client, registered, retrain, decision, config.eval_data_path, per_byte=text_bytes is not None)
    if decision.promote:
        message = f"promoted {registered.uri} to @{CHAMPION}: {decision.reason}"
    else:
        message = f"kept {incumbent} ({'@' + CHAMPION if champion else 'no champion'}); {registered.uri} rejected: {decision.reason}"
    log.info(message)
    runs.append_event(config.name, "promote", message)
    runs.update(config.name, details=message)
    record_decision(decision, name, registered.version)
    return decision


def logged_metric(client, run_id: str | None, key: str) -> float | None:
    """The last value of a metric an MLflow run logged, or None (no run, or never logged: not a chat run, or one
    trained before the stop check existed)."""
    if run_id is None:
        return None
    return client.get_run(run_id).data.metrics.get(key)


def record_decision(decision: Decision, name: str, version: str) -> None:
    """A table artifact in the flow run and the event `tessera.model.promoted` / `tessera.model.rejected`."""
    from prefect.artifacts import create_table_artifact
    from prefect.events import emit_event

    rows = [
        {"role": "challenger", "model": decision.challenger, decision.metric: round(decision.challenger_value, 6),
         "decision": "promoted" if decision.promote else "rejected"},
        {"role": "incumbent", "model": decision.incumbent, decision.metric: round(decision.incumbent_value, 6),
         "decision": "replaced" if decision.promote else "kept"},
    ]
    create_table_artifact(
        table=rows, key="promotion-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-"),
        description=f"**{'Promoted' if decision.promote else 'Rejected'}** {decision.challenger}: {decision.reason}",
    )
    emit_event(
        event=f"tessera.model.{'promoted' if decision.promote else 'rejected'}",
        resource={"prefect.resource.id": f"tessera.model.{name}", "prefect.resource.name": name},
        related=[{"prefect.resource.id": f"tessera.model-version.{name}.{version}", "prefect.resource.role": "model-version"}],
        payload=decision.model_dump(),
    )


class RetrainResult(BaseModel):
    outcome: Literal["promoted", "rejected", "skipped", "refused"]
    message: str
    version: str | None = None  # the version this retrain registered (or, skipped, the one it found)
    champion: str | None = None  # @champion after the retrain
    decision: Decision | None = None


def retrain_result(
    retrain: RetrainPlan, decision: Decision | None = None, registered: RegisteredVersion | None = None,
) -> RetrainResult:
    if decision is None:
        outcome = "skipped" if retrain.skip == "idempotent" else "refused"
        return RetrainResult(outcome=outcome, message=retrain.message, version=retrain.existing, champion=retrain.champion)
    champion = registered.uri if decision.promote else retrain.champion
    return RetrainResult(
        outcome="promoted" if decision.promote else "rejected", message=decision.reason,
        version=registered.uri if registered else None, champion=champion, decision=decision,
    )
