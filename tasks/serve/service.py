"""The BentoML service: OpenAI's API over one registered model version."""

from __future__ import annotations

import os
import secrets
import time
import uuid

import bentoml
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from tasks.serve.loading import load_registered
from tessera.generation import generate, prompt_ids

MODEL_URI_ENV = "TESSERA_MODEL_URI"
API_KEY_ENV = "TESSERA_API_KEY"

api = FastAPI(title="Tessera model endpoint")


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=256, gt=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stream: bool = False


@bentoml.service(name="tessera-chat", traffic={"timeout": 600})
@bentoml.asgi_app(api, path="/v1")
class ChatService:
    def __init__(self) -> None:
        self.model_uri = os.environ[MODEL_URI_ENV]
        self.model, self.tokenizer = load_registered(self.model_uri)
        self.api_key = os.environ.get(API_KEY_ENV)

    def _authorize(self, authorization: str | None) -> None:
        if self.api_key and not secrets.compare_digest(authorization or "", f"Bearer {self.api_key}"):
            raise HTTPException(status_code=401, detail="missing or wrong API key (Authorization: Bearer <key>)")

    @api.get("/models")
    def models(self, authorization: str | None = Header(default=None)) -> dict:
        self._authorize(authorization)
        return {"object": "list", "data": [{"id": self.model_uri, "object": "model", "owned_by": "tessera"}]}

    @api.post("/chat/completions")
    def chat_completions(self, request: ChatRequest, authorization: str | None = Header(default=None)) -> dict:
        self._authorize(authorization)
        if request.stream:
            raise HTTPException(status_code=400, detail="stream=true is not supported yet")
        try:
            ids = prompt_ids(self.tokenizer, [m.model_dump() for m in request.messages])
        except Exception as exc:  # e.g. a template that rejects the roles it was given
            raise HTTPException(status_code=400, detail=f"messages rejected by the model's chat template: {exc}") from None
        new_ids, finish = generate(self.model, self.tokenizer, ids, request.max_tokens, request.temperature, request.top_p)
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model or self.model_uri,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(new_ids),
                "total_tokens": len(ids) + len(new_ids),
            },
        }
