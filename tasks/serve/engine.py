"""Continuous batching over one model: every running request shares each forward pass.

The batch (tasks.serve.batch) runs in a background thread; results come back on the server's asyncio loop. This
module turns one request into a stream of text deltas that stop where the model's turn ends (any of its end-of-turn
tokens) or at a `stop` string, and cancels the work of a request that ended before the engine finished it: a stop
string found, its client gone, its time run out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NamedTuple

from tessera.core.generation import stop_token_ids
from tasks.serve.settings import ServeSettings


class QueueFull(Exception):
    pass


class GenerationTimeout(Exception):
    pass


class EngineError(Exception):
    pass


class ClientDisconnected(Exception):
    pass


# how often a request looks whether its client is still there: a sequence nobody reads is cancelled within it
CLIENT_CHECK_S = 0.25


@dataclass
class Delta:
    text: str  # new text since the previous delta
    finish_reason: str | None  # "stop" or "length" on the last delta, else None
    completion_tokens: int  # generated so far, end-of-turn token excluded


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]


class Engine:
    """Every request's sequences in one continuous batch (tasks.serve.batch) of at most `rows` running at once:
    greedy ones take the argmax, the others are drawn at their own temperature and top_p, side by side. Also the
    context a request may use, admission (429 beyond max_pending), and where the text of a sequence ends (its
    end-of-turn token or a stop string)."""

    def __init__(self, model, tokenizer, settings: ServeSettings, rows: int):
        from tasks.serve.batch import DenseBatch

        self.tokenizer, self.settings = tokenizer, settings
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        # one request can use the whole cache, never more than the model's positions
        self.context = min(getattr(model.config, "max_position_embeddings", settings.kv_cache_tokens), settings.kv_cache_tokens)
        self.pending = 0  # sequences admitted and not yet over
        self.batch = DenseBatch(model, settings.kv_cache_tokens, settings.max_batch_tokens, rows)

    def admit(self, sequences: int) -> None:
        """Reserve room for `sequences`, or raise QueueFull (the caller answers 429). Each is given back with
        release() when its work is over, however it ended."""
        if self.pending + sequences > self.settings.max_pending:
            raise QueueFull(f"the server is busy ({self.pending} sequences in progress, at most {self.settings.max_pending}); retry later")
        self.pending += sequences

    def release(self, *_) -> None:
        self.pending -= 1

    def in_progress(self) -> int:
        """Sequences the batch still holds, waiting or running: the work it does, whoever still reads it."""
        return self.batch.in_progress()

    def close(self) -> None:
        self.batch.close()

    def text(self, tokens: list[int], finished: bool, stops: list[str]) -> tuple[str, str | None, int]:
        """(text, finish_reason or None, tokens generated) of a sequence so far: cut at its end-of-turn token or at
        the first stop string."""
        reason = "length" if finished else None
        if tokens and tokens[-1] in self.stop_ids and not self.settings.ignore_eos:
            tokens, reason = tokens[:-1], "stop"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((at for s in stops if (at := text.find(s)) >= 0), default=None)
        if cut is not None:
            text, reason = text[:cut], "stop"
        return text, reason, len(tokens)

    async def generate(self, ids: list[int], sampling: Sampling, deadline: float,
                       disconnected: Callable[[], object] | None = None, incremental: bool = True) -> AsyncIterator[Delta]:
        """Deltas of one sequence; the last has its finish_reason. Raises GenerationTimeout past `deadline` (loop
        time), ClientDisconnected when `disconnected()` says so, and EngineError when the engine failed the request.
        Whenever the engine has not finished the sequence itself, it is cancelled: a client gone, a timeout, a stop
        string found. Without `incremental` (nobody streams it, no stop string to look for) the engine reports only
        the finished sequence: less work per token."""
        from tasks.serve.batch import Job

        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()

        def emit(tokens: list[int], finished: bool, error: str | None) -> None:  # called in the batch's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads it any more
                loop.call_soon_threadsafe(results.put_nowait, _Result(tokens, finished, error))

        job = Job(ids, sampling.max_tokens, sampling.temperature, sampling.top_p,
                  frozenset() if self.settings.ignore_eos else frozenset(self.stop_ids), emit,
                  stream=incremental or bool(sampling.stop))
        watch = _Watch(deadline, self.settings.request_timeout_s, disconnected)
        self.batch.submit(job)
        sent, finished = "", False  # finished: by the engine, so there is nothing left to cancel
        try:
            while True:
                tokens, finished, error = await _newest(results, watch)
                if error:
                    raise EngineError(error)
                text, reason, generated = self.text(tokens, finished, sampling.stop)
                if reason is None:
                    text = _settled(text, sampling.stop)
                if reason is not None or (len(text) > len(sent) and text.startswith(sent)):
                    yield Delta(text[len(sent):], reason, generated)
                    sent = text
                if reason is not None:
                    return
        finally:
            if not finished:
                self.batch.cancel(job)


class _Result(NamedTuple):
    """What the batch says of a sequence: its tokens so far, whether it is over, why it failed."""

    tokens: list[int]
    finished: bool
    error: str | None


class _Watch:
    """What ends a request's wait for the engine early: its deadline (loop time), and its client gone. The client is
    looked at every CLIENT_CHECK_S whether results arrive or not: a sequence that yields a token every step (a
    stop string to look for) would otherwise never look."""

    def __init__(self, deadline: float, limit_s: float, disconnected: Callable[[], object] | None):
        self.loop = asyncio.get_running_loop()
        self.deadline, self.limit_s, self.disconnected = deadline, limit_s, disconnected
        self.next_look = self.loop.time() + CLIENT_CHECK_S

    async def check(self) -> float:
        """Raises GenerationTimeout or ClientDisconnected; else how long to wait before the next check."""
        now = self.loop.time()
        if now >= self.deadline:
            raise GenerationTimeout(f"generation took longer than the limit of {self.limit_s:g} s")
        if now >= self.next_look:
            self.next_look = now + CLIENT_CHECK_S
            if self.disconnected is not None and await self.disconnected():
                raise ClientDisconnected("the client disconnected")
        return min(self.deadline, self.next_look) - now


async def _newest(results: asyncio.Queue, watch: _Watch):
    """The newest result of a sequence. Results are cumulative, so when several are waiting only the last counts
    (the loop catches up instead of decoding each)."""
    while True:
        wait = await watch.check()
        try:
            out = await asyncio.wait_for(results.get(), timeout=wait)
        except TimeoutError:
            continue
        while not results.empty() and not out.finished:
            out = results.get_nowait()
        return out


def engine_for(model, tokenizer, settings: ServeSettings) -> Engine:
    """The continuous batch, or for `engine: sequential` (bench/serve.py's baseline) the same loop one sequence at a
    time."""
    return Engine(model, tokenizer, settings, rows=1 if settings.engine == "sequential" else settings.max_pending)


def _settled(text: str, stops: list[str]) -> str:
    """The part of `text` that can be sent: not a half-decoded character, not what may become a stop string."""
    text = text.rstrip("\ufffd")
    for stop in stops:
        for keep in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:keep]):
                text = text[: len(text) - keep]
                break
    return text
