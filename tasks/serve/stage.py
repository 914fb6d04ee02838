"""Stage: deploy. Puts a registered version or alias behind a named endpoint (tasks.serve.endpoints): started when the
name is new (or stopped, or failed), else updated in place with its health-checked rollout. The endpoint's processes
are detached: it outlives the flow run that started it.

Also moves the endpoints that follow an alias (`models:/name@champion`) after the retrain flow moved it."""

from __future__ import annotations

from prefect import task

from tasks import stage_logger
from tessera.core import runs
from tessera.core.errors import TesseraError


@task(name="deploy-endpoint")
def deploy_endpoint(endpoint: str, model_uri: str, run_name: str | None = None) -> str:
    """Serve `model_uri` behind `endpoint`; returns the endpoint's URL. An alias URI is followed, a version pinned."""
    from tasks.serve import endpoints
    from tessera.core.processes import port_is_free

    log = stage_logger()
    try:
        existing = endpoints.get(endpoint)
    except TesseraError:  # no endpoint of that name yet
        existing = None
    if existing is None or existing.status in (endpoints.EndpointStatus.STOPPED, endpoints.EndpointStatus.FAILED):
        keep = {"host": existing.host, "port": existing.port, "api_key": existing.api_key} if existing else {}
        if keep and not port_is_free(keep["host"], keep["port"]):
            keep.pop("port")  # its old port is taken by now: any free one
        log.info("starting endpoint %s with %s", endpoint, model_uri)
        record = endpoints.serve(model_uri, name=endpoint, **keep)
        message = f"endpoint {endpoint} started at {record.url}, serving {model_uri} (version {record.version})"
    else:
        log.info("updating endpoint %s to %s", endpoint, model_uri)
        record = endpoints.update(endpoint, model_uri=model_uri)
        message = f"endpoint {endpoint} at {record.url} serves {model_uri} (version {record.version}): {record.details}"
    log.info(message)
    if run_name:
        runs.append_event(run_name, "deploy", message)
    return record.url


@task(name="update-following-endpoints")
def update_endpoints(alias_uri: str, run_name: str | None = None) -> list[str]:
    """Update every endpoint that follows `alias_uri` to the version it points at now. Each is tried; an endpoint whose
    update failed keeps serving its old version (rollback), and one TesseraError then names them all."""
    from tasks.serve import endpoints

    log = stage_logger()
    moved, failed = [], []
    for record in endpoints.following(alias_uri):
        try:
            updated = endpoints.update(record.name)
        except TesseraError as exc:
            failed.append(f"{record.name}: {exc}")
            continue
        moved.append(record.name)
        message = f"endpoint {record.name} follows {alias_uri}: serving version {updated.version}"
        log.info(message)
        if run_name:
            runs.append_event(run_name, "deploy", message)
    if failed:
        raise TesseraError(f"{alias_uri} moved, but these endpoints still serve their old version: " + "; ".join(failed))
    return moved
