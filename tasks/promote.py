"""Stage: evaluate and promote (the retrain flow's gate), and what keeps retrains of one model orderly.

- Plan: what version of the source a retrain would read (the Delta version, a file's or folder's content hash, as
  the register stage tags it) and a hash of its configuration; a version registered from both already ends the
  retrain early (idempotent), and a source older than the champion's is refused (in order). `force` overrides both.
- Held out: the eval data must not be the training data (the same path, content or table version): refused up front.
- Evaluate: the new version and the incumbent (the `@champion`, else the weights training started from) are
  scored on the same pinned eval set, tokenized and packed by the prepare stage, with the trainer's loss code; per
  trained token when both read it as the same tokens, else per byte of the trained text (tokenizers differ).
- Decide: promote when the new version's metric (lower is better) is below the incumbent's by the margin;
  otherwise the champion stays and the new version is tagged with why it lost and both values. The tags come
  first, then @champion moves, then `promotion`, last: it marks the version decided, so a retrain that dies on
  the way leaves a version that is neither promoted nor done (the next retrain of that data decides).
- One at a time per model: `model_lock` holds a Prefect global concurrency limit named after the registered model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from contextlib import contextmanager
from typing import Literal

from prefect import task
from pydantic import BaseModel

from tasks import stage_logger
from tasks.prepare.stage import PreparedData, lineage
from tasks.register import RegisteredVersion, source_tags
from tasks.validate import eval_is_training_data
from tessera.core import registry, runs
from tessera.core.config import RunConfig, RunParameters, TaskType
from tessera.core.errors import ConfigError, TesseraError
from tessera.core.tracking import mlflow_client

CHAMPION = "champion"
Metric = Literal["eval_loss", "eval_perplexity"]  # both lower-is-better, per trained token of the eval set
BITS_PER_BYTE = "eval_bits_per_byte"  # what decides instead when the two models' tokenizers differ
DECIDED = ("promoted", "rejected")  # the `promotion` tag: a version carries it only once its retrain decided
MarginMode = Literal["relative", "absolute"]
LOCK_PREFIX = "tessera-model-"
LOCK_LEASE_SECONDS = 60  # Prefect's minimum; renewed every 45 s while held (see model_lock)
EVAL_MICRO_ROWS = 4
# What shapes the trained weights (and the eval set they are judged on). Not: where the result is served, how
# inputs are checked, which engine prepares the data, the experiment, the eval prompts, the registered name (the
# check looks only among that model's versions).
HASHED_FIELDS = (
    "model", "train_data_path", "task_type", "eval_data_path", "custom_weights_path", "training_duration",
    "learning_rate", "context_length", "training_config",
)
_PINNED = re.compile(r"@v\d+$")


# --- pure logic -------------------------------------------------------------------------------------------------


class Decision(BaseModel):
    promote: bool
    metric: str
    challenger: str  # models:/name/N
    challenger_value: float
    incumbent: str  # models:/name/M (the champion) or "base model <name>"
    incumbent_value: float
    margin: float
    margin_mode: str
    threshold: float  # the challenger's value had to be below this
    reason: str


def decide(
    challenger: str, challenger_value: float, incumbent: str, incumbent_value: float, *,
    metric: str = "eval_loss", margin: float = 0.0, margin_mode: str = "relative",
) -> Decision:
    """Lower is better. Promote iff challenger_value < threshold, where threshold = incumbent_value * (1 - margin)
    (relative) or incumbent_value - margin (absolute). Margin 0: strictly better; a tie keeps the incumbent.
    A value that is not finite never wins."""
    if margin_mode not in ("relative", "absolute"):
        raise ConfigError(f"margin_mode {margin_mode!r}: expected 'relative' or 'absolute'")
    if not (margin >= 0 and math.isfinite(margin)) or (margin_mode == "relative" and margin >= 1):
        raise ConfigError(f"promotion_margin {margin}: expected >= 0 (and < 1 when relative)")
    threshold = incumbent_value * (1 - margin) if margin_mode == "relative" else incumbent_value - margin
    promote = math.isfinite(challenger_value) and math.isfinite(threshold) and challenger_value < threshold
    by = f"{margin:.2%}" if margin_mode == "relative" else f"{margin:g}"
    needed = f"below {threshold:.6g} ({incumbent} {incumbent_value:.6g}, margin {by} {margin_mode})"
    if promote:
        reason = f"{metric} {challenger_value:.6g} is {needed}"
    else:
        reason = f"{metric} {challenger_value:.6g} is not {needed}"
    return Decision(
        promote=promote, metric=metric, challenger=challenger, challenger_value=challenger_value, incumbent=incumbent,
        incumbent_value=incumbent_value, margin=margin, margin_mode=margin_mode, threshold=threshold, reason=reason,
    )


def config_hash(config: RunConfig) -> str:
    """A retrain's configuration, hashed: the HASHED_FIELDS, with tables named without their pinned version (the
    version read is the source version, compared on its own)."""
    values = config.model_dump(mode="json", include=set(HASHED_FIELDS))
    for field in ("train_data_path", "eval_data_path"):
        if values.get(field):
            values[field] = _PINNED.sub("", values[field])
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def already_registered(versions: list[tuple[str, dict]], identity: dict[str, str], hashed: str) -> str | None:
    """The first (version, tags) registered from this source identity and configuration hash, and decided: a version
    whose retrain died before its decision (killed while loading the champion, say) is not done."""
    for version, tags in versions:
        same = tags.get("config_hash") == hashed and all(tags.get(k) == v for k, v in identity.items())
        if identity and same and tags.get("promotion") in DECIDED:
            return version
    return None


def older_than_champion(source_version: int | None, champion_tags: dict | None) -> int | None:
    """The champion's source version when this one is older (strictly), else None."""
    if source_version is None or not champion_tags or champion_tags.get("source_version") in (None, ""):
        return None
    theirs = int(champion_tags["source_version"])
    return theirs if source_version < theirs else None


def lock_name(registered_model: str) -> str:
    return f"{LOCK_PREFIX}{registered_model}"


def run_parameters(parameters: dict) -> dict:
    """The retrain flow's parameters that are a run's (RunParameters), for its run record."""
    return {k: v for k, v in parameters.items() if k in RunParameters.model_fields}


# --- the run record (the flow's state hooks, given only the run's own parameters) --------------------------------


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
    hook = getattr(runs, "on_cancellation", None)  # the run record's own hook, where tessera.core.runs has one
    if hook is not None:
        hook(flow, _as_run(flow_run), state)


# --- one at a time per model ------------------------------------------------------------------------------------


def ensure_limit(name: str) -> None:
    """The global concurrency limit `name` with one slot, created if missing (two creating it at once is fine)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass


def ephemeral_api() -> bool:
    """No Prefect server configured: each process runs a temporary one over the database in PREFECT_HOME."""
    from prefect.settings import get_current_settings

    return not get_current_settings().api.url


def _home_flock(name: str, timeout_seconds: float | None):
    """An exclusive lock beside the ephemeral API's database (PREFECT_HOME), which the kernel releases when its
    holder dies, however it dies. LockTimeout (a TimeoutError) after `timeout_seconds` of waiting."""
    from prefect.settings import get_current_settings

    from tessera.core.paths import file_lock

    return file_lock(get_current_settings().home / "tessera-locks" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.lock", timeout_seconds)


def _reclaim_leaked_slots(name: str) -> None:
    """Under the home lock on the ephemeral API, a slot still taken belongs to a holder that died without releasing
    it (its lease lived in its own temporary server, and no repossessor runs there): give it back."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
        if limit.active_slots:
            stage_logger().warning("%s: %d slot(s) left taken by a run that died; reclaimed", name, limit.active_slots)
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))


@contextmanager
def model_lock(registered_model: str, timeout_seconds: float | None = None):
    """Hold the model's slot (limit `tessera-model-<name>`, occupancy 1) while the block runs: retrains of one model
    queue, others do not wait; TimeoutError after `timeout_seconds` (default: wait as long as it takes).

    With a Prefect server the slot is a lease of LOCK_LEASE_SECONDS, renewed every 3/4 of it while held; a holder
    killed outright (SIGKILL) stops renewing, and the server's repossessor (every 15 s) frees the slot within
    LOCK_LEASE_SECONDS + 15 s of the last renewal. Prefect's ephemeral API runs no repossessor, and keeps leases in
    the memory of each process's own temporary server: a killed holder's slot would stay taken for good. There the
    slot is taken under an fcntl lock in PREFECT_HOME as well (the kernel drops it when its holder dies), and a
    slot found taken under that lock is a dead holder's, reclaimed at once."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency
    from prefect.context import FlowRunContext

    name = lock_name(registered_model)
    ensure_limit(name)
    context = FlowRunContext.get()
    holder = ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id) if context and context.flow_run else None
    log = stage_logger()
    log.info("waiting for %s (one retrain of %s at a time)", name, registered_model)
    with contextlib.ExitStack() as stack:
        if ephemeral_api():
            stack.enter_context(_home_flock(name, timeout_seconds))
            _reclaim_leaked_slots(name)
        stack.enter_context(concurrency(
            name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=LOCK_LEASE_SECONDS, strict=True, holder=holder,
        ))
        log.info("holding %s", name)
        yield


# --- plan: idempotence and order ----------------------------------------------------------------------------------


class RetrainPlan(BaseModel):
    registered_model: str
    config_hash: str
    source_tags: dict[str, str]  # train_data_version or train_data_content_hash
    source_version: int | None  # the order of the data: a Delta version, or the watcher's sequence for a volume
    champion: str | None  # models:/name/N
    skip: Literal["idempotent", "older_source"] | None = None
    existing: str | None = None  # the version an idempotent retrain found
    message: str = ""


def _champion(client, name: str):
    """The @champion ModelVersion, None while there is none (the model may not be registered yet)."""
    try:
        return registry.resolve(f"models:/{name}@{CHAMPION}", client)
    except registry.NotRegistered:
        return None


def plan(config: RunConfig, source_version: int | None = None, force: bool = False) -> RetrainPlan:
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
    champion = _champion(client, name)
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


plan_retrain = task(plan, name="plan-retrain")


def fault_point(point: str) -> None:
    """Test-only fault injection: TESSERA_FAULT=<point> ends the process here, as a kill (out of memory) would."""
    if os.environ.get("TESSERA_FAULT") == point:
        raise SystemExit(f"TESSERA_FAULT={point}")


# --- evaluate -----------------------------------------------------------------------------------------------------


class Score(BaseModel):
    """A model's loss on an eval set as its own tokenizer reads it: summed over the trained tokens (nats), and how
    many they are."""

    loss_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        """Mean per trained token."""
        return self.loss_sum / max(1, self.tokens)


def score_on(model, prepared_path: str, pad_id: int = 0, micro_rows: int = EVAL_MICRO_ROWS) -> Score:
    """The loss over the whole prepared set, in fp32 (the trainer's evaluation loop)."""
    import torch

    from tasks.train.data import PackedRows
    from tasks.train.evaluation import summed_loss

    rows = PackedRows(prepared_path)
    model = model.float()
    total = summed_loss(model, rows, pad_id, micro_rows, torch.float32, next(model.parameters()).device)
    return Score(loss_sum=float(total), tokens=int(rows.trained.sum()))


def registered_score(model_uri: str, prepared: PreparedData) -> Score:
    from tasks.serve.loading import load_registered

    loaded = load_registered(model_uri)
    return score_on(loaded.model, prepared.path, loaded.tokenizer.pad_token_id or 0)


def base_score(weights: str, prepared: PreparedData) -> Score:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    if torch.cuda.is_available():
        model.to("cuda")
    return score_on(model, prepared.path, model.config.pad_token_id or 0)


def metric_value(metric: str, loss: float) -> float:
    return loss if metric == "eval_loss" else math.exp(min(loss, 50.0))


def trained_texts(task_type: TaskType, data: dict) -> list[str]:
    """What the loss is taken on, as the user wrote it: a chat's assistant turns, a response, a document."""
    if task_type is TaskType.CHAT_COMPLETION:
        return [m["content"] for m in data["messages"] if m["role"] == "assistant"]
    if task_type is TaskType.INSTRUCTION_FINETUNE:
        return [data["response"] if "response" in data else data["completion"]]
    return [data["text"]]


def trained_text_bytes(config: RunConfig, data_path: str) -> int:
    """UTF-8 bytes of the trained text of `data_path`, without template markup: the same for every tokenizer."""
    from tessera.core.records import valid_records

    records = valid_records(data_path, config.task_type)
    return sum(len(text.encode()) for r in records for text in trained_texts(config.task_type, r.data))


def eval_set_for(config: RunConfig, base: str, eval_prepared: PreparedData) -> PreparedData:
    """The eval set as a model trained from `base` reads it: its own tokenizer and template, the same context length
    (the challenger's rows when `base` is the challenger's base model)."""
    from tasks.prepare.stage import prepare

    if base == config.model:
        return eval_prepared
    return prepare(config.model_copy(update={"model": base}), config.eval_data_path, eval_prepared.stats.context_length)


def compared(metric: str, challenger: Score, incumbent: Score, text_bytes: int | None) -> tuple[str, float, float]:
    """What decides, and both values. `metric` per trained token when both models read the eval set as the same
    tokens (text_bytes None). When their tokenizers differ, per-token means are over different tokens (a finer
    tokenizer has more, each easier to predict), so bits per byte decide: the summed loss over the trained tokens,
    in bits, divided by the UTF-8 bytes of the trained text, which both models were scored on."""
    if text_bytes is None:
        return metric, metric_value(metric, challenger.loss), metric_value(metric, incumbent.loss)
    per_byte = math.log(2) * max(1, text_bytes)
    return BITS_PER_BYTE, challenger.loss_sum / per_byte, incumbent.loss_sum / per_byte


def evaluate_and_promote(
    config: RunConfig, registered: RegisteredVersion, eval_prepared: PreparedData, retrain: RetrainPlan, *,
    metric: str = "eval_loss", margin: float = 0.0, margin_mode: str = "relative",
) -> Decision:
    """Score the new version and the incumbent on the same pinned eval set, decide, then record the decision on the
    new version and move @champion (record_on_version). Records it as a table artifact and an event too."""
    from tessera.core.catalog import resolve_model

    log = stage_logger()
    client = mlflow_client()
    name = registered.name
    champion = _champion(client, name)
    challenger = registered_score(registered.uri, eval_prepared)
    fault_point("before-incumbent")
    if champion is not None and str(champion.version) != registered.version:
        incumbent = f"models:/{name}/{champion.version}"
        theirs = eval_set_for(config, champion.tags.get("base_model") or config.model, eval_prepared)
        incumbent_score = registered_score(incumbent, theirs)
        incumbent_label = f"{incumbent} (@{CHAMPION})"
    else:
        weights = config.custom_weights_path or resolve_model(config.model, config.context_length).path
        theirs, incumbent_score = eval_prepared, base_score(weights, eval_prepared)
        incumbent = incumbent_label = f"base model {config.custom_weights_path or config.model}"
    # the same rows (cache key) mean the same tokens: per token; else per byte of the text both were scored on
    same_tokens = theirs.cache_key == eval_prepared.cache_key
    text_bytes = None if same_tokens else trained_text_bytes(config, config.eval_data_path)
    measure, challenger_value, incumbent_value = compared(metric, challenger, incumbent_score, text_bytes)
    decision = decide(
        registered.uri, challenger_value, incumbent_label, incumbent_value,
        metric=measure, margin=margin, margin_mode=margin_mode,
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


def record_on_version(
    client, registered: RegisteredVersion, retrain: RetrainPlan, decision: Decision, eval_data_path: str, per_byte: bool,
) -> None:
    """The decision's tags and what the next retrain checks (config_hash, source_version), then @champion, then
    `promotion`: written last, it is what makes the version done (already_registered), and it never says promoted
    before @champion points at the version."""
    name, version = registered.name, registered.version
    tags = {
        "config_hash": retrain.config_hash,
        "promotion_reason": decision.reason,
        "promotion_metric": decision.metric,
        "promotion_measure": "per byte" if per_byte else "per token",
        f"challenger_{decision.metric}": f"{decision.challenger_value:.6g}",
        f"incumbent_{decision.metric}": f"{decision.incumbent_value:.6g}",
        "compared_with": decision.incumbent,
        "promotion_eval_data": eval_data_path,
    }
    if retrain.source_version is not None:
        tags["source_version"] = str(retrain.source_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    fault_point("before-champion-alias")
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion", "promoted" if decision.promote else "rejected")


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


promote_model = task(evaluate_and_promote, name="evaluate-and-promote")


class RetrainResult(BaseModel):
    outcome: Literal["promoted", "rejected", "skipped", "refused"]
    message: str
    version: str | None = None  # the version this retrain registered (or, skipped, the one it found)
    champion: str | None = None  # @champion after the retrain
    decision: Decision | None = None


def result(retrain: RetrainPlan, decision: Decision | None = None, registered: RegisteredVersion | None = None) -> RetrainResult:
    if decision is None:
        outcome = "skipped" if retrain.skip == "idempotent" else "refused"
        return RetrainResult(outcome=outcome, message=retrain.message, version=retrain.existing, champion=retrain.champion)
    champion = registered.uri if decision.promote else retrain.champion
    return RetrainResult(
        outcome="promoted" if decision.promote else "rejected", message=decision.reason,
        version=registered.uri if registered else None, champion=champion, decision=decision,
    )


def require_eval_data(config: RunConfig) -> None:
    """Held-out eval data, checked before anything is prepared: a gate scored on training data rewards memorizing."""
    if not config.eval_data_path:
        raise TesseraError("retrain needs eval_data_path: the new version and the champion are compared on it")
    if how := eval_is_training_data(config):
        raise ConfigError(
            f"eval_data_path {config.eval_data_path} is the training data ({how}): a version would win the promotion "
            "by memorizing it; give held-out records that are not in train_data_path"
        )
