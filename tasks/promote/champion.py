"""The @champion alias: the version that holds it, and a decision written on the new version in the order that keeps
a retrain killed on the way consistent: the tags, then @champion, then `promotion`, last."""

from __future__ import annotations

from tasks.promote.decision import Decision
from tessera.core.faults import fault_point
from tasks.promote.plan import RetrainPlan
from tasks.register import RegisteredVersion
from tessera.core import registry

CHAMPION = "champion"


def current_champion(client, name: str):
    """The @champion ModelVersion, None while there is none (the model may not be registered yet)."""
    try:
        return registry.resolve(f"models:/{name}@{CHAMPION}", client)
    except registry.NotRegistered:
        return None


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
