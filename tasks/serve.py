"""Stage: serve. A BentoML service with an OpenAI-compatible API over a registered model version.

The model and tokenizer are loaded from the registry exactly as registered, and prompts are rendered
with the chat template saved with them: the text the model was trained on.

    bentoml serve tasks.serve:ChatService   (with TESSERA_MODEL_URI=models:/<name>/<version or @alias>)
"""

from __future__ import annotations

import os
import secrets
import time
import uuid

import bentoml
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field

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


def load_registered(model_uri: str):
    """(model, tokenizer) of a registry URI, through MLflow's transformers flavor."""
    import mlflow

    from tessera.tracking import mlflow_client

    mlflow_client()
    components = mlflow.transformers.load_model(model_uri, return_type="components")
    model = components["model"]
    model.eval()
    return model, components["tokenizer"]


def generate(model, tokenizer, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float) -> tuple[list[int], str]:
    """New token ids and the finish reason ('stop' at the end-of-turn token, else 'length')."""
    import torch

    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids], device=model.device),
            max_new_tokens=max_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    new = out[0, len(prompt_ids):].tolist()
    if new and new[-1] == tokenizer.eos_token_id:
        return new[:-1], "stop"
    return new, "length"


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
        messages = [m.model_dump() for m in request.messages]
        try:
            prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as exc:  # e.g. a template that rejects the roles it was given
            raise HTTPException(status_code=400, detail=f"messages rejected by the model's chat template: {exc}") from None
        if hasattr(prompt_ids, "input_ids") or isinstance(prompt_ids, dict):
            prompt_ids = prompt_ids["input_ids"]
        new_ids, finish = generate(self.model, self.tokenizer, list(prompt_ids), request.max_tokens, request.temperature, request.top_p)
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model or self.model_uri,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(new_ids),
                "total_tokens": len(prompt_ids) + len(new_ids),
            },
        }
