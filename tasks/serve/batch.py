"""Continuous batching over a dense KV cache: the loop that generates every running sequence together.

Each running sequence has a row of the cache, its tokens at columns 0..length-1. Every step is one forward of one
packed sequence: the newest token of each sequence that is generating, then parts of the prompts of sequences that
joined (up to `max_batch_tokens` in all), so a step reads the weights once whatever it holds, and a prompt's
prefill costs the sequences already running only its compute. A finished sequence frees its row at once.
The model is transformers' own, with two things of ours plugged in: the cache it writes through (`update` puts each
token's key and value at its row and column) and its attention function (each token against its own row's cached
keys: for the generating tokens, two batched matmuls over every row, the heads that share a key head grouped so
keys are not copied; for a prompt's part, sdpa over its row).

Why not transformers' continuous-batching manager (used before): on CPU a decode step of SmolLM2-135M at 16
sequences spent a third of its time in sdpa's flash kernel, which is slow for a single query, and a seventh in
copying the cache (torch profiler), and each prompt joined in a forward of its own; this loop does none of these.
bench/serve.py --peer measures it against `transformers serve --continuous-batching`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from tasks.serve.packed_linear import pack_linears
from tessera.core.errors import ConfigError

ATTENTION = "tessera_dense"
COLUMN_STEP = 256  # the cache's columns are a multiple of this
ROW_STEP = 8  # and its rows of this: sizes that change less often than the batch does


@dataclass(eq=False)
class Job:
    """One sequence to generate. `emit(tokens, finished, error)` is called from the loop's thread: with every new
    token when `stream`, else once at the end; `error` is a message when the engine failed it."""

    ids: list[int]
    max_new_tokens: int
    temperature: float  # 0: greedy (the argmax)
    top_p: float
    stop_ids: frozenset[int]  # tokens that end it (kept as its last token); empty to always make max_new_tokens
    emit: Callable[[list[int], bool, str | None], None]
    stream: bool = True
    tokens: list[int] = field(default_factory=list)  # generated so far
    slot: int = -1  # its row of the cache while it runs
    prefilled: int = 0  # prompt tokens in its row so far
    cancelled: bool = False

    @property
    def columns(self) -> int:
        """Columns its row needs at most: the prompt and every token but the last (which is never fed back)."""
        return len(self.ids) + self.max_new_tokens - 1


@dataclass
class Layout:
    """Where the tokens of one packed forward belong: the first `len(rows)` generate (one per row in `rows`, at
    column `columns[i]`), then the prompt parts (row, first column, length), in order. A token's column is its
    position in its sequence."""

    rows: torch.Tensor  # [generating]
    columns: torch.Tensor  # [generating]
    parts: list[tuple[int, int, int]]
    held: int  # rows 0..held-1 take part in the generating tokens' attention
    used: int  # columns 0..used-1 are read
    write_rows: torch.Tensor = field(init=False)  # [tokens]: the row of every token of the forward, in order
    write_columns: torch.Tensor = field(init=False)  # [tokens]: its column
    seen: torch.Tensor = field(init=False)  # [held]: the last column a row's generating token sees (not generating: 0)
    _masks: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        device = self.rows.device
        self.write_rows = torch.cat([self.rows] + [torch.full((n,), row, device=device) for row, _, n in self.parts])
        self.write_columns = torch.cat([self.columns] + [torch.arange(at, at + n, device=device)
                                                         for _, at, n in self.parts])
        self.seen = torch.zeros(self.held, dtype=torch.long, device=device).index_put_((self.rows,), self.columns)

    def masks(self, window: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """What each token sees, for layers that see every earlier position (window None) or only the last `window`
        (a sliding-window layer: Mistral v0.1, Gemma 2 and 3): the generating tokens' `unseen` ([held, 1, 1, used],
        True where a row's token must not look) and each prompt part's `causal` ([length, its last column + 1], True
        where it looks). Built once per step and window, not once per layer."""
        if window not in self._masks:
            device, reach = self.rows.device, window or self.used + 1
            column = torch.arange(self.used, device=device)[None, :]
            unseen = (column > self.seen[:, None]) | (column <= self.seen[:, None] - reach)
            causal = []
            for _, at, n in self.parts:
                query, key = torch.arange(at, at + n, device=device)[:, None], torch.arange(at + n, device=device)
                causal.append((key <= query) & (key > query - reach))
            self._masks[window] = unseen[:, None, None, :], causal
        return self._masks[window]


def _attention(module, query, key, value, attention_mask, scaling=None, layout: Layout | None = None,
               sliding_window: int | None = None, softcap: float | None = None, s_aux=None, **_):
    """Each token of the packed forward (`query`: [1, heads, tokens, dim]) against its own row of the cache (`key`,
    `value`: [rows, key heads, columns, dim]). A sliding-window layer sees only the last `sliding_window` positions."""
    if softcap is not None or s_aux is not None:  # Gemma 2's logit soft-capping, gpt-oss's attention sinks
        missing = "soft-capping" if softcap is not None else "sinks"
        raise NotImplementedError(f"{type(module).__name__} needs attention {missing}, which Tessera's engine does not do")
    unseen, causal_masks = layout.masks(sliding_window)
    _, heads, tokens, dim = query.shape
    key_heads = key.shape[1]
    per_token = query[0].transpose(0, 1)  # [tokens, heads, dim]
    out = []
    generating = len(layout.rows)
    if generating:
        # every held row gets a query (rows not generating: zeros, their result unused), so the keys are read in place
        grouped = key.new_zeros(layout.held, heads, dim)  # in the cache's dtype
        grouped[layout.rows] = per_token[:generating].to(key.dtype)
        grouped = grouped.view(layout.held, key_heads, heads // key_heads, dim)
        scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling  # [held, key heads, group, columns]
        scores.masked_fill_(unseen, float("-inf"))
        attended = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
        out.append(attended.view(layout.held, heads, dim)[layout.rows].to(query.dtype))
    at = generating
    for (row, start, length), causal in zip(layout.parts, causal_masks):
        end = start + length
        part = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, at:at + length].to(key.dtype), key[row:row + 1, :, :end], value[row:row + 1, :, :end],
            attn_mask=causal, scale=scaling, enable_gqa=heads != key_heads,
        )
        out.append(part[0].transpose(0, 1).to(query.dtype))
        at += length
    return torch.cat(out).unsqueeze(0), None  # [1, tokens, heads, dim]


AttentionInterface.register(ATTENTION, _attention)


class DenseCache:
    """Keys and values of every layer, `[rows, key heads, columns, dim]`, resized when a joining sequence needs more
    rows or columns than are held. Before each forward the loop says where its tokens go (`place`)."""

    def __init__(self, config, dtype: torch.dtype, device: torch.device):
        self.layers = config.num_hidden_layers
        self.key_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._place: Layout | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) held now."""
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def reserve(self, rows: int, columns: int) -> None:
        """Room for rows 0..rows-1 of `columns` columns, keeping what they hold. Sized to what is asked now (rounded
        up), not to what was held before: a long row after many short ones does not make many long rows."""
        held_rows, held_columns = self.shape
        if rows <= held_rows and columns <= held_columns:
            return
        rows, columns = -(-rows // ROW_STEP) * ROW_STEP, -(-columns // COLUMN_STEP) * COLUMN_STEP
        kept_rows, kept_columns = min(rows, held_rows), min(columns, held_columns)
        for store in (self.keys, self.values):
            for layer in range(self.layers):
                grown = torch.zeros(rows, self.key_heads, columns, self.dim, dtype=self.dtype, device=self.device)
                if held_rows:
                    grown[:kept_rows, :, :kept_columns] = store[layer][:kept_rows, :, :kept_columns]
                    store[layer] = grown
                else:
                    store.append(grown)

    def move(self, source: int, target: int, columns: int) -> None:
        """Row `source`'s first `columns` columns into row `target` (the rows in use stay 0..n-1)."""
        for store in (self.keys, self.values):
            for layer in store:
                layer[target, :, :columns] = layer[source, :, :columns]

    def place(self, layout: Layout) -> None:
        self._place = layout

    def update(self, key, value, layer_idx: int, *_, **__):
        """Called by each attention layer with the forward's keys and values ([1, key heads, tokens, dim]): written
        at their rows and columns; the rows and columns in use come back (views, not copies)."""
        at = self._place
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[at.write_rows, :, at.write_columns] = key[0].transpose(0, 1).to(keys.dtype)
        values[at.write_rows, :, at.write_columns] = value[0].transpose(0, 1).to(values.dtype)
        return keys[:at.held, :, :at.used], values[:at.held, :, :at.used]


class DenseBatch:
    """The generation loop, in a thread of its own: `submit` jobs, `cancel` them; `close` stops it. A job waits
    until a row is free and its columns fit: rows x the longest row's columns stay within `kv_cache_tokens`.
    All of the model's work is done in that thread (packing its linears, a first forward, every step); load the
    model in a thread that has ended (tasks.serve.loading.in_passing_thread, which says why)."""

    def __init__(self, model, kv_cache_tokens: int, max_batch_tokens: int, max_rows: int):
        model.set_attn_implementation(ATTENTION)
        self.model = model
        self.kv_cache_tokens, self.max_batch_tokens, self.max_rows = kv_cache_tokens, max_batch_tokens, max_rows
        parameter = next(model.parameters())
        self.device = parameter.device
        # on CPU the cache is fp32 whatever the weights: bf16's batched matmuls over strided keys took 2.7x fp32's
        # time for a step's attention (SmolLM2-135M, 12 rows of 150 columns: 354 against 133 us per layer)
        cache_dtype = torch.float32 if parameter.device.type == "cpu" else parameter.dtype
        self.cache = DenseCache(model.config, cache_dtype, parameter.device)
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.waiting: list[Job] = []
        self.running: list[Job] = []  # in the order they joined: their prompts are prefilled in that order
        self.rows: list[Job] = []  # row i of the cache is rows[i]'s
        started, failed = threading.Event(), []
        self._thread = threading.Thread(target=self._run, args=(started, failed), name="tessera-batch", daemon=True)
        self._thread.start()
        started.wait()
        if failed:
            raise failed[0]

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def cancel(self, job: Job) -> None:
        job.cancelled = True  # the loop drops it before its next step

    def in_progress(self) -> int:
        """Jobs submitted and not over: waiting or running."""
        return self.inbox.qsize() + len(self.waiting) + len(self.running)

    def close(self) -> None:
        self.inbox.put(None)
        self._thread.join()

    def _run(self, started: threading.Event, failed: list[BaseException]) -> None:
        try:
            if self.device.type == "cpu":
                pack_linears(self.model, self.max_rows)  # a quarter to a half of the linears' time
            self._first_forward()
        except BaseException as exc:  # noqa: BLE001 - raised in the thread that started the batch
            failed.append(exc)
            return
        finally:
            started.set()
        self._loop()

    def _first_forward(self) -> None:
        """One token through the model before anyone is served, in a cache dropped after: a model whose attention
        needs what ours does not do fails here, as the server starts, instead of in every request."""
        self.cache.reserve(1, 1)
        first = torch.zeros(1, dtype=torch.long, device=self.device)
        try:
            with torch.inference_mode():
                self._forward([0], Layout(rows=first, columns=first, parts=[], held=1, used=1), keep=[0])
        except NotImplementedError as exc:
            raise ConfigError(f"{type(self.model).__name__} cannot be served here: {exc}; vLLM serves it "
                              f"(README: 'On a GPU: vLLM')") from None
        finally:
            self.cache.keys.clear()
            self.cache.values.clear()

    def _forward(self, ids: list[int], layout: Layout, keep: list[int]) -> torch.Tensor:
        """The logits at positions `keep` of one packed forward of `ids`, each token written where `layout` says."""
        self.cache.place(layout)
        ids, keep = torch.tensor([ids], device=self.device), torch.tensor(keep, device=self.device)
        return self.model(input_ids=ids, position_ids=layout.write_columns[None, :], past_key_values=self.cache,
                          use_cache=True, layout=layout, logits_to_keep=keep).logits[0]

    # ---- the loop ----

    def _loop(self) -> None:
        with torch.inference_mode():
            while self._take(block=not self.running and not self.waiting):
                try:
                    self._admit()
                    self._step()
                except Exception as exc:  # noqa: BLE001 - every job in the batch is told, the loop serves on
                    for job in self.running + self.waiting:
                        self._end(job, f"{type(exc).__name__}: {exc}")
                    self.waiting.clear()

    def _take(self, block: bool) -> bool:
        """New jobs into `waiting`, cancelled ones out; False once closed."""
        while True:
            try:
                job = self.inbox.get(block=block)
            except queue.Empty:
                break
            if job is None:
                return False
            self.waiting.append(job)
            block = False
        for job in [j for j in self.running if j.cancelled]:
            self._end(job)
        self.waiting = [j for j in self.waiting if not j.cancelled]
        return True

    def _admit(self) -> None:
        """Waiting jobs get a row, first come first served, while a row is free and the cache holds them all."""
        while self.waiting and len(self.running) < self.max_rows:
            job = self.waiting[0]
            columns = max([job.columns] + [j.columns for j in self.running])
            if (len(self.running) + 1) * columns > self.kv_cache_tokens and self.running:
                return  # it waits for rows to end (alone, it fits: the service caps a request at the cache)
            self.waiting.pop(0)
            job.slot = len(self.rows)
            self.rows.append(job)
            self.running.append(job)
            self.cache.reserve(len(self.rows), columns)

    def _step(self) -> None:
        """One forward: a token for every generating job, the next part of the prompts still being prefilled."""
        generating = [job for job in self.running if job.prefilled == len(job.ids)]
        budget, parts, prefilling = max(1, self.max_batch_tokens - len(generating)), [], []
        for job in self.running:
            if job.prefilled < len(job.ids) and budget > 0:
                length = min(budget, len(job.ids) - job.prefilled)
                parts.append((job.slot, job.prefilled, length))
                prefilling.append(job)
                budget -= length
        if not generating and not parts:
            return
        columns = [len(job.ids) + len(job.tokens) - 1 for job in generating]
        layout = Layout(
            rows=torch.tensor([job.slot for job in generating], dtype=torch.long, device=self.device),
            columns=torch.tensor(columns, dtype=torch.long, device=self.device), parts=parts,
            held=len(self.rows),
            used=max([column + 1 for column in columns] + [start + length for _, start, length in parts]),
        )
        ids = [job.tokens[-1] for job in generating]
        ids += [token for job, (_, start, n) in zip(prefilling, parts) for token in job.ids[start:start + n]]
        # the logits wanted: every generating token's, and the last prompt token's of a prompt now whole
        done, keep, at = [], list(range(len(generating))), len(generating)
        for job, (_, start, n) in zip(prefilling, parts):
            at += n
            job.prefilled += n
            if job.prefilled == len(job.ids):
                done.append(job)
                keep.append(at - 1)
        # (only parts of prompts, none whole yet: no logits are read, the forward only fills the cache)
        logits = self._forward(ids, layout, keep or [len(ids) - 1])
        self._advance(generating + done, logits[: len(generating) + len(done)])

    def _advance(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Each job's next token (the argmax, or drawn), then what ended is ended and the rest are told."""
        if not jobs:
            return
        logits = logits.float()  # argmax over bf16 took 4x as long on CPU (1.1 ms for 12 rows of SmolLM2's vocabulary)
        picks = logits.argmax(dim=-1)
        drawn = [i for i, job in enumerate(jobs) if job.temperature > 0]
        if drawn:
            picks[drawn] = _draw(logits[drawn], [jobs[i].temperature for i in drawn], [jobs[i].top_p for i in drawn])
        for job, token in zip(jobs, picks.tolist()):
            job.tokens.append(token)
            if token in job.stop_ids or len(job.tokens) >= job.max_new_tokens:
                self._end(job)
            elif job.stream:
                job.emit(list(job.tokens), False, None)

    def _end(self, job: Job, error: str | None = None) -> None:
        if job in self.running:
            self.running.remove(job)
            last = self.rows.pop()
            if last is not job:  # the last row takes the freed one: rows in use stay 0..n-1, none read for nothing
                # its columns: the prompt and its tokens (the newest one's column may not be written yet: moved anyway)
                self.cache.move(last.slot, job.slot, last.prefilled + len(last.tokens))
                self.rows[job.slot], last.slot = last, job.slot
        if not job.cancelled:
            job.emit(list(job.tokens), True, error)


def _draw(logits: torch.Tensor, temperatures: list[float], top_ps: list[float]) -> torch.Tensor:
    """A token per row from softmax(logits / temperature), within the smallest set of tokens whose probability
    reaches top_p (the most likely token always in it)."""
    probs = torch.softmax(logits / torch.tensor(temperatures, device=logits.device)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above each
    outside = before >= torch.tensor(top_ps, device=logits.device)[:, None]
    outside[:, 0] = False
    sorted_probs[outside] = 0
    return order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)
