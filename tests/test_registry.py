"""tessera.core.registry: what a models:/ URI names, and its lookup in a real (embedded) MLflow registry."""

from __future__ import annotations

import pytest

from tessera.core import registry
from tessera.core.errors import ConfigError


def test_a_uri_names_a_version_latest_or_an_alias():
    assert registry.parse_model_uri("models:/main.s.bot/3") == ("main.s.bot", "3", None)
    assert registry.parse_model_uri("models:/main.s.bot/latest") == ("main.s.bot", "latest", None)
    assert registry.parse_model_uri("models:/main.s.bot@champion") == ("main.s.bot", None, "champion")
    for bad in ("nope:/1", "models:/bot", "models:/bot/Production", "models:/a/b/1", "models:/bot@", "models:/bot/1 "):
        with pytest.raises(ConfigError, match="expected models:/<name>/<version> or models:/<name>@<alias>"):
            registry.parse_model_uri(bad)


def test_resolve_finds_a_version_by_number_latest_and_alias_and_names_the_uri_when_missing(home):
    from tessera.core.tracking import mlflow_client

    client = mlflow_client()
    client.create_registered_model("m")
    with pytest.raises(registry.NotRegistered, match=r"^models:/m/latest: not in the MLflow registry at sqlite:///.*no versions"):
        registry.resolve("models:/m/latest")
    for _ in range(2):
        client.create_model_version("m", source="file:///nowhere")
    client.set_registered_model_alias("m", "champion", "1")

    assert str(registry.resolve("models:/m/2").version) == "2"
    assert str(registry.resolve("models:/m/latest", client).version) == "2"
    assert str(registry.resolve("models:/m@champion").version) == "1"
    assert [int(v.version) for v in registry.versions(client, "m")] == [2, 1]
    assert registry.versions(client, "nope") == []
    for missing in ("models:/nope/1", "models:/m/3", "models:/m@gone", "models:/nope@champion"):
        with pytest.raises(registry.NotRegistered, match=f"^{missing}: not in the MLflow registry at sqlite:///") as err:
            registry.resolve(missing)
        assert "\n" not in str(err.value)


KILLED_MIDWAY_THROUGH_MIGRATIONS = """
import os, signal
import alembic.op
from tessera.core.tracking import mlflow_client

add_column, calls = alembic.op.add_column, []


def add_column_then_die(*args, **kwargs):  # as a cancel or an out-of-memory kill landing among MLflow's migrations
    add_column(*args, **kwargs)
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)


alembic.op.add_column = add_column_then_die
mlflow_client()
"""


def test_a_store_whose_creation_was_killed_midway_is_not_left_half_made(tmp_path, monkeypatch):
    """A fresh home's MLflow store is created in dozens of schema migrations; a process killed among them leaves
    nothing that the next run cannot open (it used to leave tables half-altered: "duplicate column name")."""
    import signal
    import subprocess
    import sys

    from tessera.core.tracking import experiment_id, mlflow_client

    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "fresh-home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    killed = subprocess.run([sys.executable, "-c", KILLED_MIDWAY_THROUGH_MIGRATIONS], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    client = mlflow_client()
    run = client.create_run(experiment_id(client, "/after/a/kill"))
    client.create_registered_model("main.s.after_kill")
    client.create_model_version("main.s.after_kill", source="file:///nowhere", run_id=run.info.run_id)
    assert [str(v.version) for v in client.search_model_versions("name='main.s.after_kill'")] == ["1"]
