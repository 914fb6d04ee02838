"""MLflow wiring: the tracking store (embedded SQLite in TESSERA_HOME unless the user set a server)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from tessera.core.paths import file_lock, mlflow_artifacts_root, mlflow_tracking_uri
from tessera.core.periodic import every

_ready: set[str] = set()  # SQLite stores this process has seen created

# What a run's MLflow run keeps of it, so that another host reaching the same tracking server can find the run by
# its name, tell whether it still trains, and resume it (tessera.sdk.resume) without the run's record.
RUN_NAME_TAG = "tessera.run_name"
HOST_TAG = "tessera.host"  # the host training it
HEARTBEAT_TAG = "tessera.heartbeat"  # unix time, set every heartbeat_s() while its training processes run
RUN_CONFIG_ARTIFACT = "tessera/run_config.json"  # the run's configuration, its tables pinned to the versions read


def _sqlite_lock(uri: str):
    """The lock beside an embedded store's database file (in TESSERA_HOME/mlflow unless the user pointed elsewhere)."""
    return file_lock(Path(uri.removeprefix("sqlite:///") + ".lock"))


def mlflow_client():
    """An MlflowClient on our store, with the mlflow module pointed at the same place.

    An embedded SQLite store is created (its schema migrated, its default experiment made) under an inter-process
    lock: runs started at the same moment on a fresh TESSERA_HOME would otherwise each migrate it at once and fail
    ("table ... already exists", "Online migration expected to match one row")."""
    import mlflow
    from mlflow import MlflowClient

    uri = mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not uri.startswith("sqlite:///") or uri in _ready:
        return MlflowClient(uri, registry_uri=uri)
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _sqlite_lock(uri):
        if not path.exists():  # made whole aside, then put in place (below)
            _create_store(path)
        client = MlflowClient(uri, registry_uri=uri)
    _ready.add(uri)
    return client


def _create_store(path: Path) -> None:
    """A new SQLite store, created beside `path` and renamed into place once whole. MLflow creates it in dozens of
    schema migrations: a run cancelled or killed midway (seen: a cancel in a fresh home's first seconds) would leave
    a half-migrated store that every later run fails to open ("duplicate column name")."""
    import os

    from mlflow import MlflowClient

    staging = path.with_name(f"{path.name}.creating-{os.getpid()}")
    staging.unlink(missing_ok=True)  # a creation of this process's pid that was killed
    uri = f"sqlite:///{staging}"
    client = MlflowClient(uri, registry_uri=uri)  # the tracking store: its tables, the default experiment
    client.search_registered_models(max_results=1)  # and the registry's
    os.replace(staging, path)


def experiment_id(client, name: str) -> str:
    """The experiment's id, created if missing; two runs creating it at once get the same one."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow_tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        root = mlflow_artifacts_root()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
        with _sqlite_lock(uri):
            exp = client.get_experiment_by_name(name)
            return exp.experiment_id if exp is not None else client.create_experiment(name, artifact_location=location)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # a server: another run created it meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def local_artifact_path(uri: str) -> Path | None:
    """An MLflow artifact location as a folder on this machine (file:// or a plain path); None for a remote store
    (s3://, and a tracking server's proxied `mlflow-artifacts:/...`, which has no `//`)."""
    from urllib.parse import urlparse

    if urlparse(uri).scheme in ("", "file"):
        return Path(uri.removeprefix("file://"))
    return None


def download_folder(uri: str, out: Path) -> Path:
    """The artifact folder at `uri` (a remote store's) as the folder `out`, whole or not at all: downloaded beside
    it, then renamed into place. If another process put it there first, theirs is kept."""
    import os
    import tempfile

    import mlflow

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".downloading-", dir=out.parent) as tmp:
        got = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        try:
            os.rename(got, out)
        except OSError:
            if not out.is_dir():
                raise
    return out


def heartbeat_s() -> float:
    """How often a training run's MLflow run says it lives (TESSERA_HEARTBEAT_S, default 30 s); one unheard of for
    three times that has stopped."""
    return float(os.environ.get("TESSERA_HEARTBEAT_S", "30"))


def heartbeat(client, run_id: str) -> contextlib.AbstractContextManager[None]:
    """Set the MLflow run's HEARTBEAT_TAG now and every heartbeat_s() while the block runs (on a thread)."""
    def beat() -> None:
        with contextlib.suppress(Exception):  # the server unreachable for a moment: the next beat
            client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")

    return every(heartbeat_s(), beat, "mlflow-heartbeat", first=True)


def silent_for(run) -> float | None:
    """Seconds since a RUNNING MLflow run's last heartbeat; None when it has none."""
    beat = run.data.tags.get(HEARTBEAT_TAG)
    return None if beat is None else time.time() - float(beat)


def find_run(client, name: str):
    """The newest MLflow run of the training run `name` (its RUN_NAME_TAG), in any experiment; None if none."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.`{RUN_NAME_TAG}` = '{name}'", order_by=["attributes.start_time DESC"],
                               max_results=1) if experiments else []
    return found[0] if found else None
