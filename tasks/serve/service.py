"""The BentoML service: OpenAI's API over one registered model version.

Chat models answer on /v1/chat/completions through the chat template saved with them; every model answers on
/v1/completions with the prompt encoded as plain text, as instruction and pretraining data were trained. Every
request goes through one continuous-batching engine (engine.py); every error is answered in OpenAI's shape.
GET /_tessera/engine says what the server is working on (requests being answered, sequences being generated).
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks.serve.api import ApiError, ChatRequest, CompletionRequest, Reply, parse_body, sse, usage
from tasks.serve.engine import ClientDisconnected, GenerationTimeout, QueueFull, Sampling, engine_for
from tasks.serve.loading import load_registered
from tessera.core.generation import prompt_ids
from tasks.serve.settings import ServeSettings, authorized, read_body

MODEL_URI_ENV = "TESSERA_MODEL_URI"
API_KEY_ENV = "TESSERA_API_KEY"


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # unknown routes, wrong methods
    return await _api_error(request, ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return await _api_error(request, ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))


def _answering_in_openais_shape(app: FastAPI) -> FastAPI:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    return app


api = _answering_in_openais_shape(FastAPI(title="Tessera model endpoint"))  # OpenAI's API, under /v1
stats = _answering_in_openais_shape(FastAPI(title="Tessera model endpoint: its state"))  # under /_tessera


@bentoml.service(name="tessera-chat", traffic={"timeout": 3600})
@bentoml.asgi_app(api, path="/v1")
@bentoml.asgi_app(stats, path="/_tessera")
class ChatService:
    def __init__(self) -> None:
        self.model_uri = os.environ[MODEL_URI_ENV]
        self.api_key = os.environ.get(API_KEY_ENV)
        self.settings = ServeSettings.from_env()
        loaded = load_registered(self.model_uri)
        self.tokenizer, self.task = loaded.tokenizer, loaded.task
        self.engine = engine_for(loaded.model, loaded.tokenizer, self.settings)
        self.answering = 0  # requests whose answer is being made (a stream: while it is being sent)

    @stats.get("/engine")
    async def engine_state(self, request: Request) -> dict:
        """What the server is working on: requests being answered, sequences the engine is generating."""
        self._authorize(request)
        return {"requests": self.answering, "sequences": self.engine.in_progress()}

    @api.get("/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.model_uri, "object": "model", "created": 0, "owned_by": "tessera"}]}

    @api.post("/chat/completions")
    async def chat_completions(self, request: Request):
        body = await self._read(request, ChatRequest)
        if self.task != "llm/v1/chat":
            raise ApiError(400, f"{self.model_uri} was trained for completions ({self.task}), not chat: call /v1/completions", "messages")
        try:
            ids = prompt_ids(self.tokenizer, [m.as_template_input() for m in body.messages])
        except Exception as exc:  # the template's own rules (e.g. roles must alternate)
            raise ApiError(400, f"messages: rejected by the model's chat template: {exc}", "messages") from None
        return await self._respond(request, body, [ids], chat=True)

    @api.post("/completions")
    async def completions(self, request: Request):
        body = await self._read(request, CompletionRequest)
        return await self._respond(request, body, [prompt_ids(self.tokenizer, p) for p in body.prompts], chat=False)

    # ---- the request: who, how big, what it asks ----

    def _authorize(self, request: Request) -> None:
        if not authorized(request.headers.get("authorization"), self.api_key):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key")

    async def _read(self, request: Request, model):
        """The parsed body."""
        self._authorize(request)
        raw = await read_body(request.stream(), self.settings.max_body_bytes)
        if raw is None:
            raise ApiError(413, f"the request body is over the limit of {self.settings.max_body_bytes} bytes")
        body = parse_body(raw, request.headers.get("content-type"), model)
        body.check_supported(self.settings.max_n)
        return body

    def _max_tokens(self, body, prompts: list[list[int]]) -> int:
        """New tokens per sequence: as asked, or the server's default where the context leaves room for it."""
        context, longest = self.engine.context, max(len(ids) for ids in prompts)
        param = "messages" if isinstance(body, ChatRequest) else "prompt"
        if longest >= context:
            raise ApiError(400, f"{param}: the prompt is {longest} tokens; this endpoint's context is {context}", param, "context_length_exceeded")
        asked = body.new_tokens
        if asked is None:
            return min(self.settings.default_max_tokens, context - longest)
        if longest + asked > context:
            name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise ApiError(400, f"{name}: {asked} new tokens after a prompt of {longest} do not fit the context of {context}", name, "context_length_exceeded")
        return asked

    # ---- the answer: whole, or streamed as server-sent events ----

    async def _respond(self, request: Request, body, prompts: list[list[int]], chat: bool):
        sampling = Sampling(self._max_tokens(body, prompts), body.temperature, body.top_p, body.stop_strings)
        sequences = [ids for ids in prompts for _ in range(body.n)]  # choice i is prompt i // n
        try:
            self.engine.admit(len(sequences))
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="rate_limit_exceeded") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        deltas: asyncio.Queue = asyncio.Queue()
        workers = [asyncio.create_task(self._pump(i, ids, sampling, deadline, request, deltas, body.stream)) for i, ids in enumerate(sequences)]
        for worker in workers:
            worker.add_done_callback(self.engine.release)
        reply = Reply(chat, body.model or self.model_uri)
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            return StreamingResponse(self._events(reply, workers, deltas, prompt_tokens, body.include_usage), media_type="text/event-stream")
        return await self._whole(reply, workers, deltas, prompt_tokens)

    @contextlib.contextmanager
    def _answer(self):
        """Counted in `answering` while it lasts."""
        self.answering += 1
        try:
            yield
        finally:
            self.answering -= 1

    async def _whole(self, reply: Reply, workers, deltas: asyncio.Queue, prompt_tokens: int) -> dict:
        """The answer in one body, once every choice is finished."""
        texts, finishes, generated = [""] * len(workers), [None] * len(workers), [0] * len(workers)
        try:
            with self._answer():
                for _ in workers:
                    while True:
                        index, delta = await _take(deltas)
                        texts[index] += delta.text
                        generated[index] = delta.completion_tokens
                        if delta.finish_reason:
                            finishes[index] = delta.finish_reason
                            break
        finally:
            for worker in workers:
                worker.cancel()
        return reply.whole(list(zip(texts, finishes)), usage(prompt_tokens, sum(generated)))

    async def _pump(self, index: int, ids: list[int], sampling: Sampling, deadline: float, request: Request,
                    deltas: asyncio.Queue, stream: bool):
        """One sequence's deltas into `deltas`, then how it ended if not finished: the response waits on `deltas`
        alone, so every end (a timeout, a client gone, a failure) must be put there, or it would wait forever."""
        try:
            async for delta in self.engine.generate(ids, sampling, deadline, request.is_disconnected, incremental=stream):
                deltas.put_nowait((index, delta))
        except Exception as exc:  # noqa: BLE001 - answered by _take
            deltas.put_nowait((index, exc))

    async def _events(self, reply: Reply, workers, deltas: asyncio.Queue, prompt_tokens: int, include_usage: bool):
        """OpenAI's chunks: a role chunk per choice (chat), content deltas, a finish_reason chunk per choice, a usage
        chunk when asked for, then [DONE]. A timeout or engine failure ends the stream with an error chunk."""
        generated = [0] * len(workers)
        try:
            with self._answer():
                if reply.chat:
                    for index in range(len(workers)):
                        yield reply.chunk(index, "", role=True)
                for _ in workers:
                    while True:
                        index, delta = await _take(deltas)
                        generated[index] = delta.completion_tokens
                        if delta.text:
                            yield reply.chunk(index, delta.text)
                        if delta.finish_reason:
                            yield reply.chunk(index, "", delta.finish_reason)
                            break
                if include_usage:
                    yield reply.usage_chunk(usage(prompt_tokens, sum(generated)))
        except ApiError as exc:
            yield sse(exc.body())
        finally:
            for worker in workers:
                worker.cancel()
        yield sse("[DONE]")


async def _take(deltas: asyncio.Queue):
    """The next (choice index, Delta); how a sequence ended early becomes the ApiError it is answered with."""
    index, delta = await deltas.get()
    if isinstance(delta, GenerationTimeout):
        raise ApiError(504, str(delta), code="timeout")
    if isinstance(delta, ClientDisconnected):  # nobody reads this answer: it only ends the response
        raise ApiError(499, str(delta), code="client_disconnected")
    if isinstance(delta, Exception):
        raise ApiError(500, f"generation failed: {type(delta).__name__}: {delta}")
    return index, delta
