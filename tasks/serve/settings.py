"""How an endpoint serves: its limits and its KV cache, one definition for the service, the CLI and bench/serve.py;
and the checks of a request that both the model server and an endpoint's router make (its API key, its body's size).

Every field can be set for a server process as TESSERA_SERVE_<FIELD> (e.g. TESSERA_SERVE_MAX_PENDING=8).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterable
from typing import Literal

from pydantic import BaseModel, Field

ENV_PREFIX = "TESSERA_SERVE_"


class ServeSettings(BaseModel):
    max_pending: int = Field(64, ge=1, description="requested sequences in the engine (running or queued); beyond it 429")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body; beyond it 413")
    request_timeout_s: float = Field(300.0, gt=0, description="generation time limit of one request; beyond it 504")
    default_max_tokens: int = Field(512, ge=1, description="new tokens when a request sets no max_tokens")
    max_n: int = Field(8, ge=1, description="most choices one request may ask for")
    kv_cache_tokens: int = Field(32768, ge=256, description="KV cache size in tokens, shared by all running requests")
    max_batch_tokens: int = Field(2048, ge=64, description="most tokens one forward pass of the batch takes")
    engine: Literal["continuous", "sequential"] = Field(
        "continuous", description="sequential: one sequence at a time through the same loop (the baseline of bench/serve.py)"
    )
    ignore_eos: bool = Field(False, description="always generate max_tokens, past the end of the turn (for benchmarks)")

    @classmethod
    def from_env(cls, environ: dict | None = None) -> ServeSettings:
        environ = os.environ if environ is None else environ
        values = {name: environ[ENV_PREFIX + name.upper()] for name in cls.model_fields if ENV_PREFIX + name.upper() in environ}
        return cls.model_validate(values)

    def as_env(self) -> dict[str, str]:
        return {ENV_PREFIX + name.upper(): str(value) for name, value in self.model_dump().items()}


async def read_body(chunks: AsyncIterable[bytes], limit: int) -> bytes | None:
    """A request's body, or None when it is over `limit` bytes. An oversized body is still read to its end (and
    dropped), so that the client, which is still sending it, hears the 413 instead of a broken connection."""
    body, over = bytearray(), False
    async for chunk in chunks:
        over = over or len(body) + len(chunk) > limit
        if not over:
            body += chunk
    return None if over else bytes(body)


def authorized(authorization: str | None, api_key: str | None) -> bool:
    """Whether an Authorization header carries the API key (any header does when no key is set). Compared as bytes:
    compare_digest raises on a str with a character outside ASCII, and a header may hold any byte (servers decode
    headers as latin-1, so encoding back gives the bytes that were sent)."""
    if not api_key:
        return True
    return secrets.compare_digest((authorization or "").encode("latin-1"), f"Bearer {api_key}".encode())
