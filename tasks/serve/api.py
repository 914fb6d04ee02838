"""OpenAI's API, as data: request bodies, the error shape, response and stream-chunk bodies.

A field we cannot honour is refused (400 naming it) when it is set to anything but its neutral value; fields that
clients send by habit are accepted at their neutral values; any other field is refused as OpenAI refuses it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 504: "timeout_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict:
        """What the chat template renders: `developer` is OpenAI's newer name for `system`."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """What both routes take."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    # sent by habit: accepted, and honoured only at their neutral values (NEUTRAL)
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None

    # field -> the values it may take here. seed: the continuous-batching engine seeds once per process, not per
    # request, so a seed could not make one request reproducible.
    NEUTRAL: ClassVar[dict] = {
        "seed": (None,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}),
        "logprobs": (None, False, 0), "top_logprobs": (None, 0), "store": (None, False), "service_tier": (None, "auto", "default"),
    }

    def check_supported(self, max_n: int) -> None:
        for name, neutral in self.NEUTRAL.items():
            if getattr(self, name) not in neutral:
                raise ApiError(400, f"{name}: not supported by this endpoint (only {neutral[0]!r} or unset)", name, "unsupported_parameter")
        if self.n > max_n:
            raise ApiError(400, f"n: at most {max_n} choices per request", "n")
        stops = self.stop_strings
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", "stop")

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None

    NEUTRAL: ClassVar[dict] = _Request.NEUTRAL | {"tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    NEUTRAL: ClassVar[dict] = _Request.NEUTRAL | {"echo": (False,), "suffix": (None, ""), "best_of": (None, 1)}

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def new_tokens(self) -> int | None:
        return self.max_tokens


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def parse_body(raw: bytes, content_type: str | None, model: type[_Request]) -> _Request:
    """The request, or an ApiError naming what is wrong with it."""
    if content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"expected Content-Type: application/json, got {content_type or 'none'}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # a union's errors are located under each member's type name (content.str): name the field only
        param = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _TYPE_NAMES or "[" in p))) or None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"{param}: unrecognized request argument", param, "unknown_parameter") from None
        value = "" if first["type"] == "missing" else f" (got {json.dumps(first.get('input'))[:80]})"
        raise ApiError(400, f"{param}: {first['msg']}{value}", param, "invalid_value") from None


class Reply:
    """Bodies of one response, chat or completion, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def choice(self, index: int, text: str, finish_reason: str | None, chunk: bool = False, role: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if not chunk:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, choices: list[tuple[str, str]], usage: dict) -> dict:
        return self._envelope([self.choice(i, text, finish) for i, (text, finish) in enumerate(choices)], False) | {"usage": usage}

    def chunk(self, index: int, text: str, finish_reason: str | None = None, role: bool = False) -> str:
        return sse(self._envelope([self.choice(index, text, finish_reason, chunk=True, role=role)], True))

    def usage_chunk(self, usage: dict) -> str:
        return sse(self._envelope([], True) | {"usage": usage})


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
