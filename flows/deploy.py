"""Serve a registered model: one stage, a version or alias behind a named endpoint (health-checked rollout, rolled
back if the new version fails its check). Composition only; logic is in tasks/serve/stage.py and tasks/serve/endpoints/."""

from __future__ import annotations

from prefect import flow

from tasks.serve.stage import deploy_endpoint


@flow(name="deploy-endpoint")
def deploy(endpoint: str, model_uri: str) -> str:
    """Put `model_uri` behind the named endpoint `endpoint`; returns its URL. The endpoint outlives the flow run.

    Args:
        endpoint: the endpoint's name; started if new, else updated in place (same URL) with a health-checked rollout
        model_uri: models:/<catalog.schema.model>/<version>, or models:/<catalog.schema.model>@<alias> (followed: a later update serves where the alias points)
    """
    return deploy_endpoint(endpoint, model_uri)
