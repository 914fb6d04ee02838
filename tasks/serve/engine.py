"""Continuous batching over one model: every running request shares each forward pass.

transformers' continuous-batching manager runs the batch in a background thread with a paged KV cache; results
come back on the server's asyncio loop. This module turns one request into a stream of text deltas that stop where
the model's turn ends (any of its end-of-turn tokens) or at a `stop` string, and cancels the work of a request
that ended before the engine finished it: a stop string found, its client gone, its time run out.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tessera.core.generation import stop_token_ids
from tasks.serve.settings import ServeSettings

# temperature 0 means greedy; the engine samples, and at this temperature sampling is the argmax (STACK.md)
GREEDY_TEMPERATURE = 1e-5


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


class _Admission:
    """What both engines share: the context a request may use, admission (429 beyond max_pending), and where the
    text of a sequence ends (its end-of-turn token or a stop string)."""

    def __init__(self, model, tokenizer, settings: ServeSettings):
        self.tokenizer, self.settings = tokenizer, settings
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        # one request can use the whole cache, never more than the model's positions
        self.context = min(getattr(model.config, "max_position_embeddings", settings.kv_cache_tokens), settings.kv_cache_tokens)
        self.pending = 0  # sequences admitted and not yet over

    def admit(self, sequences: int) -> None:
        """Reserve room for `sequences`, or raise QueueFull (the caller answers 429). Each is given back with
        release() when its work is over, however it ended."""
        if self.pending + sequences > self.settings.max_pending:
            raise QueueFull(f"the server is busy ({self.pending} sequences in progress, at most {self.settings.max_pending}); retry later")
        self.pending += sequences

    def release(self, *_) -> None:
        self.pending -= 1

    def in_progress(self) -> int:
        """Sequences being generated or waiting to be."""
        return self.pending

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

    def close(self) -> None:
        pass


class Engine(_Admission):
    """Two continuous-batching managers over the one model: greedy requests (temperature 0) go to one that takes the
    argmax of each step's logits; requests that sample go to one that applies each request's temperature and top_p,
    started on the first of them. A manager samples all its sequences or none, and sampling every step (a softmax,
    top-p's sort of the vocabulary, a draw) costs a greedy batch a third of its speed: measured in-process on
    SmolLM2-135M, 16 clients, 175 tok/s greedy, 115 through the sampling path at temperature 1e-5. A server that
    gets both kinds holds two KV caches of kv_cache_tokens each."""

    def __init__(self, model, tokenizer, settings: ServeSettings):
        super().__init__(model, tokenizer, settings)
        self.model = model
        self.greedy = self._start(sampling=False)
        self.sampling = None

    def _start(self, sampling: bool):
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        # per-request temperature and top_p take effect only when the base config has non-default values of them
        shape = {"do_sample": True, "temperature": 0.5, "top_p": 0.5} if sampling else {"do_sample": False}
        base = GenerationConfig(**shape, max_new_tokens=self.settings.default_max_tokens, eos_token_id=self.stop_ids, pad_token_id=pad)
        # sized explicitly: by default the cache takes 60% of RAM on CPU and 30 s to allocate (STACK.md)
        batching = ContinuousBatchingConfig(
            page_size=self.settings.page_size, num_blocks=max(1, self.settings.kv_cache_tokens // self.settings.page_size),
            max_batch_tokens=self.settings.max_batch_tokens, per_request_processors=sampling,
        )
        manager = self.model.init_continuous_batching(generation_config=base, continuous_batching_config=batching)
        manager.start()
        return manager

    def _managers(self) -> list:
        return [m for m in (self.greedy, self.sampling) if m is not None]

    def close(self) -> None:
        for manager in self._managers():
            manager.stop(block=True)

    def in_progress(self) -> int:
        """Sequences the managers still hold, queued or running: the work they do, whoever still reads it."""
        held = 0
        for manager in self._managers():
            scheduler = getattr(getattr(manager, "batch_processor", None), "scheduler", None)
            held += manager.input_queue.qsize()
            held += len(scheduler.active_requests) + len(scheduler.waiting_requests) if scheduler is not None else 0
        return held

    async def generate(self, ids: list[int], sampling: Sampling, deadline: float,
                       disconnected: Callable[[], object] | None = None, incremental: bool = True) -> AsyncIterator[Delta]:
        """Deltas of one sequence; the last has its finish_reason. Raises GenerationTimeout past `deadline` (loop
        time), ClientDisconnected when `disconnected()` says so, and EngineError when the engine failed the request.
        Whenever the engine has not finished the sequence itself, it is cancelled: a client gone, a timeout, a stop
        string found. Without `incremental` (nobody streams it, no stop string to look for) the engine reports only
        the finished sequence: less work per token."""
        rid = uuid.uuid4().hex
        results: asyncio.Queue = asyncio.Queue()
        watch = _Watch(deadline, self.settings.request_timeout_s, disconnected)
        if sampling.temperature > 0:
            if self.sampling is None:
                self.sampling = self._start(sampling=True)
            manager, draw = self.sampling, {"temperature": max(sampling.temperature, GREEDY_TEMPERATURE), "top_p": sampling.top_p}
        else:
            manager, draw = self.greedy, {}
        manager.register_result_handler(rid, results.put_nowait)
        manager.add_request(
            ids, request_id=rid, max_new_tokens=sampling.max_tokens, streaming=incremental or bool(sampling.stop),
            eos_token_id=-1 if self.settings.ignore_eos else self.stop_ids, **draw,
        )
        sent, finished = "", False  # finished: by the engine, so there is nothing left to cancel
        try:
            while True:
                out = await _newest(results, watch)
                finished = out.is_finished()
                if out.error:
                    raise EngineError(out.error)
                text, reason, generated = self.text(list(out.generated_tokens), finished, sampling.stop)
                if reason is None:
                    text = _settled(text, sampling.stop)
                if reason is not None or (len(text) > len(sent) and text.startswith(sent)):
                    yield Delta(text[len(sent):], reason, generated)
                    sent = text
                if reason is not None:
                    return
        finally:
            if not finished:
                manager.cancel_request(rid)
            with manager.output_router._lock:  # a cancelled request never finishes, so its handler stays
                manager.output_router.result_handlers.pop(rid, None)


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
        while not results.empty() and not out.is_finished():
            out = results.get_nowait()
        return out


class SequentialEngine(_Admission):
    """The baseline bench/serve.py measures against: one request at a time, each with plain `generate`."""

    def __init__(self, model, tokenizer, settings: ServeSettings):
        super().__init__(model, tokenizer, settings)
        self.model, self.lock = model, asyncio.Lock()

    async def generate(self, ids: list[int], sampling: Sampling, deadline: float, disconnected=None, incremental=True) -> AsyncIterator[Delta]:
        from tessera.core.generation import generate

        async with self.lock:
            tokens, finish = await asyncio.to_thread(
                generate, self.model, self.tokenizer, ids, sampling.max_tokens, sampling.temperature, sampling.top_p,
                self.settings.ignore_eos,
            )
        text, reason, generated = self.text(tokens, True, sampling.stop)  # the end-of-turn token is already cut
        yield Delta(text, "stop" if finish == "stop" else reason, generated)


def engine_for(model, tokenizer, settings: ServeSettings) -> _Admission:
    return (Engine if settings.engine == "continuous" else SequentialEngine)(model, tokenizer, settings)


def _settled(text: str, stops: list[str]) -> str:
    """The part of `text` that can be sent: not a half-decoded character, not what may become a stop string."""
    text = text.rstrip("\ufffd")
    for stop in stops:
        for keep in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:keep]):
                text = text[: len(text) - keep]
                break
    return text
