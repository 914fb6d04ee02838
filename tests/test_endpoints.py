"""Named endpoints: one URL through updates (a router in front of `bentoml serve` backends), health-checked
rollout, rollback of a version that fails, alias following, and status that is checked, not believed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

MODEL = "main.s.bot"
KEY = "s3cret"


def cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=timeout)


def register_tiny(tiny_model_dir: Path, count: int = 1, broken: bool = False) -> list[str]:
    """Register the tiny model `count` times under MODEL, without training; `broken`: the last version's stored
    weights are cut in half afterwards (a version that registered fine but cannot load)."""
    import mlflow

    from tasks.log_model import log_model_folder
    from tessera.core.tracking import experiment_id, mlflow_client

    client = mlflow_client()
    versions = []
    for _ in range(count):
        with mlflow.start_run(experiment_id=experiment_id(client, "/tests/endpoints")):
            info = log_model_folder(tiny_model_dir, "llm/v1/chat", MODEL)
        versions.append(str(info.registered_model_version))
    if broken:
        location = mlflow.get_logged_model(info.model_id).artifact_location
        (weights,) = Path(location.removeprefix("file://")).rglob("model.safetensors")
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return versions


class Traffic:
    """A client sending chat requests through the endpoint's URL in a loop; every failure is kept."""

    def __init__(self, url: str):
        self.url, self.failures, self.versions = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/chat/completions", json=body)
                    if r.status_code == 200 and r.json()["choices"]:
                        self.versions.append(r.headers["x-tessera-model-version"])
                    else:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")
                except Exception as exc:  # noqa: BLE001 - every kind of failure counts
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.05)  # a steady client, leaving the 2 cores to the servers being started

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def bentoml_serving(model_uri: str) -> list[int]:
    """Pids of live processes started with TESSERA_MODEL_URI=model_uri (a model server and its workers)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("TESSERA_MODEL_URI") == model_uri and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


def group_gone(pgid: int) -> bool:
    """Whether no process is left in the session a process we started leads (it and everything it started).
    Zombies count as gone: their parent (the CLI, since exited) no longer reaps them."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return False
        except (OSError, psutil.Error):
            pass
    return True


@pytest.mark.slow
def test_an_endpoint_keeps_its_url_through_updates_and_rolls_back_a_broken_version(home, tiny_model_dir):
    from tasks.serve import endpoints
    from tessera.core.processes import free_port
    from tessera.core.tracking import mlflow_client

    assert register_tiny(tiny_model_dir, 2) == ["1", "2"]
    assert register_tiny(tiny_model_dir, 1, broken=True) == ["3"]
    client = mlflow_client()
    client.set_registered_model_alias(MODEL, "champion", "1")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = cli("serve", f"models:/{MODEL}@champion", "--name", "bot", "--port", str(port), "--api-key", KEY, "--detach")
    assert started.returncode == 0, started.stderr
    assert f"endpoint bot ready at {url}/v1 (version 1, following models:/{MODEL}@champion)" in started.stdout

    listed = cli("endpoints", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[:5] == ["bot", "READY", "v1", f"models:/{MODEL}@champion", url]
    shown = cli("endpoints", "get", "bot")
    assert shown.returncode == 0 and "follows_alias  yes" in shown.stdout and "api_key        required" in shown.stdout
    assert KEY not in shown.stdout
    first = endpoints.get("bot")
    assert (first.status.value, first.version, first.url) == ("READY", "1", url)
    assert oct(record_mode := os.stat(endpoints.record_file("bot")).st_mode & 0o777) == "0o600", record_mode
    # the model server is handed the version, never the alias: a restarted worker loads what the record says
    assert bentoml_serving(f"models:/{MODEL}/1") and bentoml_serving(f"models:/{MODEL}@champion") == []

    # the router passes status, headers and Authorization through
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/v1/models")
    assert refused.value.code == 401
    import httpx

    # a key with characters outside ASCII is refused like any wrong key, and nobody else notices
    for path in ("/v1/models", endpoints.STATUS_PATH):
        assert httpx.get(url + path, headers={"Authorization": "Bearer s3crét".encode()}).status_code == 401, path
    models = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(models) as r:
        assert r.headers["content-type"] == "application/json"
        assert [m["id"] for m in json.load(r)["data"]] == [f"models:/{MODEL}/1"]

    # the router adds nothing: a greedy answer through the endpoint's URL is the model server's own, byte for byte,
    # but for the id and time of each answer
    greedy = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}
    routed, direct = (httpx.post(f"{base}/v1/chat/completions", json=greedy, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=60) for base in (url, first.backend.url))
    assert routed.status_code == direct.status_code == 200, (routed.text, direct.text)
    assert routed.headers["content-type"] == direct.headers["content-type"]
    assert ({k: v for k, v in routed.json().items() if k not in ("id", "created")}
            == {k: v for k, v in direct.json().items() if k not in ("id", "created")})
    assert routed.json()["choices"][0]["message"]["content"]

    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line for line in s.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2, events

    # a second serve under the same name is refused at once
    again = cli("serve", f"models:/{MODEL}/2", "--name", "bot", "--detach")
    assert again.returncode == 1 and "endpoint bot is already READY" in again.stderr

    # the alias moves; update serves the new version with no failed request
    client.set_registered_model_alias(MODEL, "champion", "2")
    with Traffic(url) as traffic:
        time.sleep(1)
        updated = cli("endpoints", "update", "bot")
        time.sleep(1)
    assert updated.returncode == 0, updated.stderr
    assert "updated from version 1 to 2" in updated.stdout
    assert traffic.failures == []
    assert traffic.versions[0] == "1" and traffic.versions[-1] == "2" and len(traffic.versions) > 10
    second = endpoints.get("bot")
    assert (second.status.value, second.version, second.url, second.router_pid) == ("READY", "2", url, first.router_pid)
    assert group_gone(first.backend.pid)  # the old server is stopped, its workers too

    # a version that cannot load fails its start; the old one never stops serving
    with Traffic(url) as traffic:
        broken = cli("endpoints", "update", "bot", "--model", f"models:/{MODEL}/3")
    assert broken.returncode == 1
    assert broken.stderr.count("\n") == 1 and "Traceback" not in broken.stderr, broken.stderr
    assert broken.stderr.startswith(f"error: endpoint bot: update to models:/{MODEL}/3 (version 3) failed: ")
    assert "the model server failed to load the model: safetensors" in broken.stderr  # the reason, from its log
    assert "version 2 keeps serving" in broken.stderr
    assert traffic.failures == [] and set(traffic.versions) == {"2"} and traffic.versions
    kept = endpoints.get("bot")
    assert (kept.status.value, kept.version, kept.model_uri, kept.candidate) == ("READY", "2", f"models:/{MODEL}@champion", None)
    assert kept.backend.pid == second.backend.pid
    assert bentoml_serving(f"models:/{MODEL}/3") == []  # the failed server is gone

    # the alias moves back, and two updates run at once (back-to-back retrains): the second waits its turn
    client.set_registered_model_alias(MODEL, "champion", "1")
    updates = [subprocess.Popen([sys.executable, "-m", "tessera.cli", "endpoints", "update", "bot"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(2)]
    outcomes = sorted((u.wait(timeout=400), *u.communicate()) for u in updates)
    assert [code for code, _, _ in outcomes] == [0, 0], outcomes
    said = sorted(out for _, out, _ in outcomes)
    assert "nothing to do" in said[0] and "updated from version 2 to 1" in said[1], said
    assert endpoints.get("bot").version == "1"
    with urllib.request.urlopen(urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    ), timeout=60) as r:
        assert r.status == 200 and r.headers["x-tessera-model-version"] == "1"

    last = endpoints.get("bot")
    stopped = cli("endpoints", "stop", "bot")
    assert stopped.returncode == 0, stopped.stderr
    assert endpoints.get("bot").status.value == "STOPPED"
    assert group_gone(last.router_pid) and group_gone(last.backend.pid)
    assert bentoml_serving(f"models:/{MODEL}@champion") == []
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/readyz", timeout=2)
    assert cli("endpoints", "list").stdout.split()[:2] == ["bot", "STOPPED"]

    # without --detach, `tessera serve` waits, and SIGTERM (or Ctrl-C) stops the endpoint it started
    port = free_port()
    foreground = subprocess.Popen(
        [sys.executable, "-m", "tessera.cli", "serve", f"models:/{MODEL}/2", "--name", "fg", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    try:
        for line in foreground.stdout:
            if "ready at" in line:
                break
        assert foreground.poll() is None, foreground.stderr.read()
        fg = endpoints.get("fg")
        assert (fg.status.value, fg.version, fg.follow) == ("READY", "2", False)
        foreground.terminate()
        assert foreground.wait(timeout=90) == 0
    finally:
        foreground.kill()
    assert endpoints.get("fg").status.value == "STOPPED"
    assert group_gone(fg.router_pid) and group_gone(fg.backend.pid)


def test_serve_refuses_a_model_that_is_not_registered_before_starting_anything(home):
    started = time.monotonic()
    result = cli("serve", "models:/nope/1", timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: models:/nope/1: not in the MLflow registry at sqlite:///"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (home / "endpoints" / "nope.json").exists()
    assert time.monotonic() - started < 60
    malformed = cli("serve", "nope:/1")
    assert malformed.returncode == 2 and "expected models:/<name>/<version> or models:/<name>@<alias>" in malformed.stderr


def _record(name: str, router: tuple[int, float], backend: tuple[int, float]):
    from tasks.serve import endpoints

    at = endpoints.now()
    server = endpoints.Backend(model_uri=f"models:/{MODEL}/1", version="1", url="http://127.0.0.1:9", pid=backend[0],
                               create_time=backend[1], log="backend.log", started_at=at)
    return endpoints.save(endpoints.EndpointRecord(
        name=name, model_uri=f"models:/{MODEL}/1", follow=False, registered_model=MODEL, version="1", host="127.0.0.1",
        port=9, url="http://127.0.0.1:9", router_pid=router[0], router_create_time=router[1], backend=server,
        status=endpoints.EndpointStatus.READY, created_at=at, updated_at=at,
    ))


def test_status_is_checked_against_the_processes_not_taken_from_the_record(home):
    import psutil

    from tasks.serve import endpoints
    from tessera.core.errors import TesseraError

    gone = subprocess.Popen(["sleep", "0"])
    gone.wait()
    me = (os.getpid(), psutil.Process().create_time())
    with subprocess.Popen(["sleep", "60"]) as alive:
        live = (alive.pid, psutil.Process(alive.pid).create_time())
        _record("dead-router", (gone.pid, 1.0), live)
        _record("reused-pid", me, (live[0], live[1] - 100))  # a process with the backend's pid, started later
        _record("not-ready", me, live)  # both alive, but nothing answers /readyz on port 9

        dead = endpoints.get("dead-router")
        assert dead.status.value == "FAILED" and f"router (pid {gone.pid}) is not running" in dead.details
        reused = endpoints.get("reused-pid")
        assert reused.status.value == "FAILED" and f"model server (pid {live[0]}, version 1) is not running" in reused.details
        assert endpoints.get("not-ready").status.value == "NOT_READY"
        assert endpoints.load("dead-router").status.value == "READY"  # reading does not rewrite the record

        listed = cli("endpoints", "list")
        assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
            ["dead-router", "FAILED"], ["not-ready", "NOT_READY"], ["reused-pid", "FAILED"],
        ]
        shown = cli("endpoints", "get", "dead-router")
        assert shown.returncode == 1 and "status         FAILED" in shown.stdout
        with pytest.raises(TesseraError, match="endpoint dead-router is FAILED, not serving"):
            endpoints.update("dead-router")
        alive.kill()
    missing = cli("endpoints", "get", "nope")
    assert missing.returncode == 1 and missing.stderr.startswith("error: no endpoint named 'nope'")
    probe = ("import sys; from tessera.cli import main; main(['endpoints', 'list']); "
             "print(sorted(m for m in ('torch', 'mlflow', 'bentoml', 'prefect', 'pyspark', 'httpx') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ.copy())
    assert imported.stdout.splitlines()[-1] == "[]", imported.stderr


@contextmanager
def fake_backend(version: str):
    """A stand-in model server in a thread: an SSE stream, a status and content type to pass through, an echo
    of the Authorization header."""
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from tessera.core.processes import free_port

    async def events(request):
        async def gen():
            for i in range(3):
                yield f"data: {json.dumps({'i': i, 'version': version})}\n\n".encode()
                await asyncio.sleep(0.6)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    async def teapot(request):
        body = await request.body()
        return Response(body, status_code=418, media_type="application/x-teapot", headers={"x-backend": version})

    async def whoami(request):
        return JSONResponse({"authorization": request.headers.get("authorization"), "version": version,
                             "query": request.url.query})

    app = Starlette(routes=[Route("/v1/events", events), Route("/teapot", teapot, methods=["POST"]), Route("/whoami", whoami)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_router_streams_passes_everything_through_and_follows_the_record(home):
    import httpx

    from tasks.serve import endpoints
    from tasks.serve.endpoints.processes import start_router, stop_process
    from tessera.core.processes import free_port
    from tasks.serve.settings import ServeSettings

    port = free_port()
    record = endpoints.save(endpoints.EndpointRecord(
        name="r", model_uri=f"models:/{MODEL}/1", follow=False, registered_model=MODEL, host="127.0.0.1", port=port,
        url=f"http://127.0.0.1:{port}", api_key=KEY, created_at=endpoints.now(), updated_at=endpoints.now(),
    ))
    url = record.url
    with fake_backend("1") as one, fake_backend("2") as two:
        start_router(record)
        try:
            assert httpx.get(f"{url}/readyz").status_code == 503  # no backend yet
            at = endpoints.now()
            limits = ServeSettings(max_body_bytes=2048)  # the model server's: the router applies them
            record.backend = endpoints.Backend(model_uri=record.model_uri, version="1", url=one, pid=1, create_time=0,
                                               log="x", started_at=at, settings=limits)
            endpoints.save(record)

            big = httpx.post(f"{url}/teapot", content=b"t" * 2049, headers={"content-type": "text/plain"})
            assert big.status_code == 413 and "2048 bytes" in big.json()["error"]["message"], big.text
            assert httpx.post(f"{url}/teapot", content=b"t" * 2048).status_code == 418  # at the limit: passed on
            assert httpx.get(f"{url}/_tessera/router", headers={"Authorization": "Bearer s3crét".encode()}).status_code == 401

            reply = httpx.post(f"{url}/teapot", content=b"tea", headers={"content-type": "text/plain"})
            assert (reply.status_code, reply.headers["content-type"], reply.headers["x-backend"], reply.content) == (
                418, "application/x-teapot", "1", b"tea")
            assert reply.headers["x-tessera-model-version"] == "1"
            echoed = httpx.get(f"{url}/whoami?a=1&b=2", headers={"Authorization": "Bearer k"}).json()
            assert echoed == {"authorization": "Bearer k", "version": "1", "query": "a=1&b=2"}

            begun = time.monotonic()
            arrivals = []
            with httpx.stream("GET", f"{url}/v1/events", timeout=30) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        arrivals.append((time.monotonic() - begun, line))
            assert [line for _, line in arrivals][-1] == "data: [DONE]" and len(arrivals) == 4
            assert arrivals[-1][0] - arrivals[0][0] > 1.2  # each event as it was sent (0.6 s apart), not all at the end

            record.backend = record.backend.model_copy(update={"url": two, "version": "2"})
            endpoints.save(record)
            assert httpx.get(f"{url}/whoami").json()["version"] == "2"  # the next request goes to the new backend
            state = httpx.get(f"{url}/_tessera/router", headers={"Authorization": f"Bearer {KEY}"}).json()
            assert state["backend"] == two and state["inflight"] == {}
        finally:
            stop_process(record.router_pid, record.router_create_time, grace=10)


def test_a_rollout_drains_the_old_server_for_as_long_as_its_requests_may_run():
    from tasks.serve import endpoints
    from tasks.serve.settings import ServeSettings

    def backend(**fields):
        return endpoints.Backend(model_uri=f"models:/{MODEL}/1", version="1", url="http://127.0.0.1:9", pid=1, create_time=0,
                                 log="x", started_at=endpoints.now(), **fields)

    assert endpoints.drain_seconds(backend(settings=ServeSettings(request_timeout_s=900))) > 900
    written_before_settings_were_kept = backend().model_dump(mode="json", exclude={"settings"})
    assert endpoints.drain_seconds(endpoints.Backend.model_validate(written_before_settings_were_kept)) > 300
