"""Packaging: a Bento of the serving service with a registered tiny model inside it, built offline by
`python -m tasks.serve.bento`, then served with `bentoml serve <tag>` with the registry out of reach."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_serve import register

pytestmark = pytest.mark.slow

MODEL = "main.bento.chat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def test_bento_holds_the_registered_model_and_serves_it(home, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default experiment keeps artifacts in ./mlruns
    uri = register(tiny_model_dir, MODEL, "llm/v1/chat")
    from tasks.serve.loading import bento_manifest, load_registered

    assert bento_manifest() is None and load_registered(uri).task == "llm/v1/chat"  # outside a Bento: the registry
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("BENTOML_HOME", None)

    started = time.monotonic()
    built = subprocess.run([sys.executable, "-m", "tasks.serve.bento", uri], env=env, capture_output=True, text=True, timeout=600)
    build_s = time.monotonic() - started
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1]
    name, version = tag.split(":")
    assert name == MODEL
    print(f"bento {tag} built in {build_s:.1f} s")

    # The Bento in the store of $TESSERA_HOME/bentoml: the sources, the manifest, and the imported model it names
    bentoml_home = home / "bentoml"
    bento_dir = bentoml_home / "bentos" / name / version
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["service"] == "tasks.serve.service:ChatService"
    model_tag = f"{MODEL}:1"
    assert model_tag in [m["tag"] for m in info["models"]]
    pins = dict(line.split("==") for line in info["image"]["python_requirements"].split())
    assert pins["bentoml"] == "1.4.39" and pins["torch"] == "2.13.0" and {"mlflow", "transformers"} <= set(pins)
    manifest = json.loads((bento_dir / "src" / "tessera_bento.json").read_text())
    assert manifest == {**manifest, "model_uri": uri, "bento_model": model_tag, "task": "llm/v1/chat"}
    for source in ("tasks/serve/service.py", "tasks/serve/loading.py", "tessera/core/generation.py"):
        assert (bento_dir / "src" / source).is_file()
    assert (bentoml_home / "models" / MODEL / "1" / "mlflow_model" / "MLmodel").is_file()

    listed = subprocess.run([sys.executable, "-m", "bentoml", "list", "-o", "json"], env={**env, "BENTOML_HOME": str(bentoml_home)},
                            capture_output=True, text=True, timeout=300)
    assert tag in [b["tag"] for b in json.loads(listed.stdout)], listed.stderr[-2000:]

    # Served from the Bento with the registry out of reach: an empty TESSERA_HOME, no TESSERA_MODEL_URI, run elsewhere
    port = _free_port()
    serve_env = {**env, "BENTOML_HOME": str(bentoml_home), "TESSERA_HOME": str(tmp_path / "elsewhere")}
    for key in ("TESSERA_MODEL_URI", "MLFLOW_TRACKING_URI", "PYTHONPATH"):
        serve_env.pop(key, None)
    log_path = tmp_path / "bento-serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
                                env=serve_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"bentoml serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"not ready after 240 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as response:
            assert [m["id"] for m in json.loads(response.read())["data"]] == [uri]
        status, body = _post(f"{base}/v1/completions", {"prompt": "hello", "max_tokens": 2})
        assert status == 200, body
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 2
        assert not (tmp_path / "elsewhere" / "mlflow").exists()  # nothing asked the registry
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
