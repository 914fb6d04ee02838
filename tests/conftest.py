"""Shared test set-up: offline, telemetry off, a fresh TESSERA_HOME per test, the tiny model built once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[key] = value
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tessera.tiny_model import build_tiny_chat

    return build_tiny_chat(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """A fresh TESSERA_HOME with the session's tiny model already in it."""
    home = tmp_path / "tessera-home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny-chat").symlink_to(tiny_model_dir)
    monkeypatch.setenv("TESSERA_HOME", str(home))
    monkeypatch.setenv("PREFECT_HOME", str(home / "prefect"))
    monkeypatch.delenv("TESSERA_VOLUMES_ROOT", raising=False)
    return home


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, records: list) -> Path:
    """Records as JSONL; a str entry is written as a raw line (for malformed-input tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat(*turns: str, system: str | None = None) -> dict:
    """chat('q', 'a', 'q2', 'a2') -> a valid messages record (user/assistant alternating)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


@pytest.fixture(scope="session", autouse=True)
def stop_prefect_servers():
    """Stop the ephemeral Prefect servers in-process flow runs started, while pytest's output is still open
    (Prefect would otherwise stop them at exit and log into a closed stream)."""
    yield
    import sys

    if "prefect.server.api.server" in sys.modules:
        from prefect._internal.concurrency.services import _QueueServiceBase
        from prefect.server.api.server import SubprocessASGIServer

        _QueueServiceBase.drain_all(timeout=30, at_exit=False)  # logs and events still on their way to the server
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
