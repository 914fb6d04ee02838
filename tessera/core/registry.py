"""The MLflow model registry as Tessera reads it: what a `models:/` URI names, and the versions of a model.

Every lookup of a registered version goes through here (the retrain gate's champion, an endpoint's version, a
Bento's model), so a URI means the same thing everywhere and a missing model, version or alias is one error that
names the URI. MLflow is imported inside the functions: the CLI imports this module and must start fast."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import NamedTuple

from tessera.core.errors import ConfigError, TesseraError
from tessera.core.paths import mlflow_tracking_uri

URI_RE = re.compile(r"models:/([^/@\s]+)(?:/(\d+|latest)|@([A-Za-z0-9_-]+))")


class NotRegistered(TesseraError):
    """The model, version or alias a URI names is not in the registry."""


class ModelRef(NamedTuple):
    """A registered model and one of: a version number, `latest`, an alias."""

    name: str
    version: str | None
    alias: str | None


def parse_model_uri(uri: str) -> ModelRef:
    """What models:/name/N, models:/name/latest or models:/name@alias names; ConfigError for anything else."""
    m = URI_RE.fullmatch(uri)
    if not m:
        raise ConfigError(f"{uri}: expected models:/<name>/<version> or models:/<name>@<alias> (or models:/<name>/latest)")
    return ModelRef(*m.groups())


def versions(client, name: str) -> list:
    """The model's ModelVersions, newest first (none when the model is not registered)."""
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True)


@contextlib.contextmanager
def _quiet_mlflow():
    """MLflow and alembic at WARNING meanwhile: a fresh store logs its migrations, and a user's mistake should read
    as one line."""
    quiet = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _lookup(client, ref: ModelRef):
    if ref.alias:
        return client.get_model_version_by_alias(ref.name, ref.alias)
    if ref.version == "latest":
        newest = versions(client, ref.name)
        if not newest:
            raise NotRegistered(f"models:/{ref.name}/latest: not in the MLflow registry at {mlflow_tracking_uri()} ({ref.name} has no versions)")
        return newest[0]
    return client.get_model_version(ref.name, ref.version)


def resolve(model_uri: str, client=None):
    """The registered ModelVersion a URI names now, ready to load: a version is frozen to its number here, so that
    whoever loads it later gets this one even when the alias has moved since. NotRegistered (naming the URI and the
    store) when the model, version or alias is missing; TesseraError when the version is not READY."""
    from mlflow.exceptions import MlflowException

    from tessera.core.tracking import mlflow_client

    ref = parse_model_uri(model_uri)
    with _quiet_mlflow():
        try:
            found = _lookup(client or mlflow_client(), ref)
        except MlflowException as exc:
            reason = " ".join(str(exc.message).split())
            raise NotRegistered(f"{model_uri}: not in the MLflow registry at {mlflow_tracking_uri()} ({reason})") from None
    if found.status not in ("READY", None):
        raise TesseraError(f"{model_uri}: version {found.version} is {found.status}, not READY")
    return found
