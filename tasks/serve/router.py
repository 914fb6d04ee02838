"""An endpoint's router: the endpoint's one URL, forwarding every request to the endpoint's current backend.

`python -m tasks.serve.router RECORD --host H --port P` serves on the endpoint's port and forwards each request,
unchanged, to the `bentoml serve` process named in the endpoint record (tasks.serve.endpoints): method, path,
query, body and headers (Authorization included) go in; status, headers and body come back, streamed as
they arrive (server-sent events pass through unbuffered). The record is re-read whenever the file changes,
so an update switches traffic by writing the record; requests already under way finish on the backend
they started on. `GET /_tessera/router` says which backend the router uses and how many requests each one
has in flight: an update waits for the old backend's count to reach zero before stopping it.

Imports only Starlette, uvicorn, httpx and tasks.serve.settings: it starts in about a second.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tasks.serve.settings import ServeSettings, authorized, read_body

STATUS_PATH = "/_tessera/router"
VERSION_HEADER = "x-tessera-model-version"
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host",
}


class BackendTable:
    """The endpoint's current backend, from its record file; re-read when the file changes (it is replaced
    atomically, so a read sees a whole record)."""

    def __init__(self, record: Path):
        self.record = record
        self.stamp: tuple | None = None
        self.backend: dict | None = None
        self.api_key: str | None = None
        self.inflight: dict[str, int] = {}

    def current(self) -> dict | None:
        try:
            st = os.stat(self.record)
        except OSError:
            return self.backend  # removed: keep serving what we had
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp != self.stamp:
            try:
                data = json.loads(self.record.read_text())
            except (OSError, ValueError):
                return self.backend
            self.stamp, self.backend, self.api_key = stamp, data.get("backend"), data.get("api_key")
        return self.backend

    def begin(self, url: str) -> None:
        self.inflight[url] = self.inflight.get(url, 0) + 1

    def end(self, url: str) -> None:
        left = self.inflight.get(url, 0) - 1
        if left > 0:
            self.inflight[url] = left
        else:
            self.inflight.pop(url, None)


def _error(status: int, message: str) -> JSONResponse:
    """OpenAI's error shape, as the model server answers."""
    return JSONResponse({"error": {"message": message, "type": "tessera_router", "param": None, "code": None}}, status_code=status)


def build_app(record: Path) -> Starlette:
    table = BackendTable(record)
    client: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app):
        timeout = httpx.Timeout(connect=5.0, read=None, write=60.0, pool=None)  # generations may take minutes
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as c:
            client["c"] = c
            yield

    async def status(request: Request) -> Response:
        backend = table.current()
        if not authorized(request.headers.get("authorization"), table.api_key):
            return _error(401, "missing or wrong API key (Authorization: Bearer <key>)")
        return JSONResponse({
            "pid": os.getpid(), "backend": backend and backend.get("url"),
            "version": backend and backend.get("version"), "inflight": table.inflight,
        })

    async def proxy(request: Request) -> Response:
        limit = ServeSettings.model_validate((table.current() or {}).get("settings", {})).max_body_bytes
        body = await read_body(request.stream(), limit)  # the model server's limit, before it takes our memory
        if body is None:
            return _error(413, f"the request body is over the limit of {limit} bytes")
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        client_host = request.client.host if request.client else ""
        headers += [(b"x-forwarded-for", client_host.encode()), (b"x-forwarded-proto", request.url.scheme.encode())]
        if "host" in request.headers:
            headers.append((b"x-forwarded-host", request.headers["host"].encode("latin-1")))
        path = request.scope.get("raw_path") or request.url.path.encode()  # as the client sent it (%-escapes kept)
        target = path.decode("latin-1") + (f"?{request.url.query}" if request.url.query else "")
        tried: set[str] = set()
        while True:
            backend = table.current()  # chosen and counted in one step: nothing else runs in between
            if not backend:
                return _error(503, "the endpoint is starting: no model server is ready yet")
            url = backend["url"]
            if url in tried:
                return _error(502, f"the endpoint's model server (version {backend.get('version')}) is not answering")
            tried.add(url)
            table.begin(url)
            try:
                upstream = await client["c"].send(
                    client["c"].build_request(request.method, url + target, headers=headers, content=body), stream=True,
                )
            except httpx.ConnectError:  # never reached the server, so safe to send again: to a newer backend, if any
                table.end(url)
                table.stamp = None
                continue
            except httpx.HTTPError as exc:
                table.end(url)
                return _error(502, f"the endpoint's model server failed: {type(exc).__name__}: {exc}")
            break

        done = False

        async def close() -> None:
            nonlocal done
            if not done:
                done = True
                table.end(url)
                await upstream.aclose()

        async def stream():
            try:
                async for chunk in upstream.aiter_raw():  # as the server sends it: SSE events arrive one by one
                    yield chunk
            finally:
                await close()

        response = StreamingResponse(stream(), status_code=upstream.status_code)
        raw = [(k, v) for k, v in upstream.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        if backend.get("version"):
            raw.append((VERSION_HEADER.encode(), str(backend["version"]).encode()))
        response.raw_headers = raw
        return response

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    return Starlette(
        routes=[Route(STATUS_PATH, status, methods=["GET"]), Route("/{path:path}", proxy, methods=methods)],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m tasks.serve.router", description=__doc__.splitlines()[0])
    p.add_argument("record", type=Path, help="the endpoint's record (TESSERA_HOME/endpoints/NAME.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    uvicorn.run(
        build_app(args.record), host=args.host, port=args.port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=30, timeout_keep_alive=30,
        server_header=False, date_header=False,  # the backend's own come through
    )


if __name__ == "__main__":
    main()
