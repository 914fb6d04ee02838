"""Starting and stopping one model server (`bentoml serve` of tasks.serve.service) as a child process, for the demo,
bench/serve.py and the tests; and what a named endpoint (tasks.serve.endpoints) starts its backends with: the command,
its environment, a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tessera.core.errors import TesseraError
from tessera.core.paths import mlflow_tracking_uri
from tessera.core.processes import free_port, stop_tree

REPO_ROOT = Path(__file__).resolve().parents[2]


def serve_command(host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "bentoml", "serve", "tasks.serve.service:ChatService",
        "--host", host, "--port", str(port), "--working-dir", str(REPO_ROOT),
    ]


def serve_env(model_uri: str, api_key: str | None = None) -> dict:
    if not model_uri.startswith("models:/"):
        raise TesseraError(f"{model_uri}: expected models:/<name>/<version> or models:/<name>@<alias>")
    env = dict(os.environ, TESSERA_MODEL_URI=model_uri, MLFLOW_TRACKING_URI=mlflow_tracking_uri())
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if api_key:
        env["TESSERA_API_KEY"] = api_key
    return env


@dataclass
class Endpoint:
    url: str
    process: subprocess.Popen

    def stop(self) -> None:
        """`bentoml serve` and its workers, which would outlive it if it alone were stopped."""
        stop_tree(self.process.pid, grace=30, popen=self.process)

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_endpoint(model_uri: str, host: str = "127.0.0.1", port: int | None = None, api_key: str | None = None,
                   log_file: Path | None = None, timeout: float = 180) -> Endpoint:
    """Start the server in the background and return once /readyz answers (the model is loaded)."""
    port = port or free_port(host)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(serve_command(host, port), env=serve_env(model_uri, api_key), stdout=out, stderr=subprocess.STDOUT)
    endpoint = Endpoint(url=f"http://{host}:{port}", process=process)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise TesseraError(f"the endpoint for {model_uri} exited with code {process.returncode}" + (f"; see {log_file}" if log_file else ""))
        try:
            with urllib.request.urlopen(f"{endpoint.url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return endpoint
        except OSError:
            pass
        time.sleep(0.5)
    endpoint.stop()
    raise TesseraError(f"the endpoint for {model_uri} was not ready after {timeout:.0f}s")
