"""Tokenizing records in batches, with loss masks: a batch of records becomes Examples (token ids and labels).

Loss masks come from the tokenizer's own chat template (never a hand-written copy), so training and
serving see the same text, and a template whose masks come out empty is refused instead of training
on nothing. Each assistant turn is trained through the token that ends it (the EOS token, or the
template's own end-of-turn token when that is another one), so the model learns to stop where serving
stops it (tessera.core.generation.stop_token_ids).

The lowest of the prepare modules: packing, the streaming pipeline, the stage and the Spark path all take
Examples from here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path

import numpy as np
from jinja2 import TemplateError

from tessera.core.config import TaskType
from tessera.core.errors import TesseraError
from tessera.core.generation import end_of_turn
from tessera.core.sources import Record
from tessera.core.training import IGNORE_INDEX


@dataclass
class Examples:
    """Tokenized examples laid end to end: example i is [starts[i], starts[i] + lengths[i]) of ids and labels."""

    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: list[list[int]] | None = None) -> Examples:
        """From one list of token ids per example; labels default to a copy of the ids (train on every token)."""
        lengths = np.array([len(x) for x in ids], np.int32)
        flat_ids = np.fromiter(chain.from_iterable(ids), np.int32, count=int(lengths.sum()))
        if labels is None:
            return cls(flat_ids, flat_ids.copy(), lengths)
        return cls(flat_ids, np.fromiter(chain.from_iterable(labels), np.int32, count=len(flat_ids)), lengths)

    @classmethod
    def concat(cls, parts: list[Examples]) -> Examples:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "labels", "lengths")))

    def fit(self, context_length: int) -> tuple[Examples, int, int]:
        """Cut each example to the context, never train its first token (that would be predicting it from the
        previous example in the row), and drop examples left with nothing to train.
        Returns (fitted, number truncated, number dropped)."""
        lengths = np.minimum(self.lengths, context_length)
        keep = positions(self.lengths) < context_length
        ids, labels = self.ids[keep], self.labels[keep]
        labels[np.cumsum(lengths) - lengths] = IGNORE_INDEX
        owner = np.repeat(np.arange(len(lengths)), lengths)
        trainable = np.bincount(owner[labels != IGNORE_INDEX], minlength=len(lengths)) > 0
        keep = trainable[owner]
        fitted = Examples(ids[keep], labels[keep], lengths[trainable])
        return fitted, int((self.lengths > context_length).sum()), int((~trainable).sum())


def positions(lengths: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at each segment: the position of every token inside its example (or row)."""
    return np.arange(int(lengths.sum()), dtype=np.int32) - np.repeat(np.cumsum(lengths) - lengths, lengths).astype(np.int32)


def rust_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers tokenizer, which batch-encodes in Rust without the GIL.

    Calling it directly (not tokenizer(...), which reconfigures it on every call) is what makes it safe
    to share between threads. Truncation or padding its files may set is switched off (lengths are
    counted and cut here); tokenizer(...) sets its own again on each call, so this changes nothing there.
    """
    rust = getattr(tokenizer, "backend_tokenizer", None)
    if rust is None:
        raise TesseraError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; data prep needs one")
    if rust.truncation or rust.padding:
        rust.no_truncation()
        rust.no_padding()
    return rust


def tokenizer_hash(tokenizer) -> str:
    """Everything tokenizing depends on: the Rust tokenizer (vocab, merges, normalizer, special tokens), template, EOS."""
    h = hashlib.sha256(rust_tokenizer(tokenizer).to_str().encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.eos_token]).encode())
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")  # never a tokenizer's


def tokenizer_files_hash(model_dir: Path) -> str:
    """A local model directory's tokenizer, hashed without loading it (so without importing transformers): the content
    of every file AutoTokenizer.from_pretrained may read there, that is the directory's own files (tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, chat templates, vocab and merges files; config.json, whose
    model_type picks the tokenizer class) and additional_chat_templates/, weights aside. Files are left out by kind,
    not picked by name: hashing one that tokenizing does not depend on costs at most a cache miss, while missing one
    that it does could reuse rows that another tokenizer made."""
    files = [p for p in model_dir.iterdir() if p.is_file() and p.suffix not in WEIGHT_SUFFIXES]
    files += (model_dir / "additional_chat_templates").glob("*.jinja")
    h = hashlib.sha256()
    for path in sorted(files):
        content = path.read_bytes()
        h.update(f"{path.relative_to(model_dir)}\0{len(content)}\0".encode())  # a file's name and size frame its bytes
        h.update(content)
    return h.hexdigest()


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise TesseraError("the model's tokenizer has no EOS token; it cannot learn where a response ends")
    return tokenizer.eos_token_id


def _render(tokenizer, messages, where: str, add_generation_prompt=False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:  # the template's own raise_exception(), or a failure on what this record holds
        raise TesseraError(
            f"{where}: the chat template of model {tokenizer.name_or_path} cannot render this conversation: {exc}"
        ) from None


def assistant_spans(tokenizer, messages: list[dict], where: str, added_tokens: Iterable[str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans to train on: each assistant reply and the token that
    ends its turn, the first special or added token after the reply (the EOS token, or an end-of-turn token
    such as `<|eot_id|>` that is not EOS: the one the model stops at, tessera.core.generation.stop_token_ids).

    Each span is found by rendering the conversation up to that reply with and without the reply, so
    it comes from the template itself; a template that renders prefixes inconsistently is refused.
    `where` names the record in errors; `added_tokens` are the tokenizer's (looked up once per batch).
    """
    text = _render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], where, add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], where) if i + 1 < len(messages) else text
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise TesseraError(
                f"{where}: the chat template of model {tokenizer.name_or_path} renders a conversation differently "
                "from its prefixes, so assistant tokens cannot be located for the loss mask"
            )
        turn = upto[len(prompt):]
        content = message["content"].strip()  # templates may trim it
        content_end = turn.find(content) + len(content) if content in turn else 0
        ends = end_of_turn(turn, content_end, added_tokens)
        end = ends[0] + len(ends[1]) if ends else len(turn)  # a template without end tokens: the whole turn
        spans.append((len(prompt), len(prompt) + end))
    return text, spans


def tokenize_chats(tokenizer, conversations: list[list[dict]], names: Iterable[str] | None = None) -> Examples:
    """Labels are the token itself inside assistant replies and their end tokens, IGNORE_INDEX elsewhere.
    `names` (each record's `where`) name the conversations in errors.

    A token is trained when its first character lies in a span; all spans of the batch are put on one
    character axis so a single searchsorted classifies every token.
    """
    added = tokenizer.get_added_vocab()
    rendered = [
        assistant_spans(tokenizer, messages, where, added)
        for messages, where in zip(conversations, names or repeat("a conversation"))
    ]
    texts = [text for text, _ in rendered]
    encodings = rust_tokenizer(tokenizer).encode_batch(texts, add_special_tokens=False)
    ex = Examples.from_lists([e.ids for e in encodings])
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)), np.int64)
    first, last = offsets[0::2], offsets[1::2]
    text_at = np.cumsum([len(t) for t in texts]) - [len(t) for t in texts]  # each text's place on the batch axis
    first_on_axis = first + np.repeat(text_at, ex.lengths)
    spans = np.array([(at + a, at + b) for at, (_, sp) in zip(text_at, rendered) for a, b in sp], np.int64).reshape(-1, 2)
    span = np.searchsorted(spans[:, 0], first_on_axis, side="right") - 1
    inside = (span >= 0) & (first_on_axis < spans[np.maximum(span, 0), 1]) & (last > first)
    ex.labels[~inside] = IGNORE_INDEX
    return ex


def tokenize_instructions(tokenizer, prompts: list[str], responses: list[str]) -> Examples:
    """No template (formatting is the user's pre-processing); loss on the response and the EOS token.

    The prompt is encoded as the tokenizer encodes any text (with BOS, if the model has one), the
    response after it without special tokens.
    """
    rust, eos = rust_tokenizer(tokenizer), eos_id(tokenizer)
    ids, labels = [], []
    for p, r in zip(rust.encode_batch_fast(prompts), rust.encode_batch_fast(responses, add_special_tokens=False)):
        p, r = p.ids, r.ids
        r.append(eos)
        ids.append(p + r)
        labels.append([IGNORE_INDEX] * len(p) + r)
    return Examples.from_lists(ids, labels)


def tokenize_documents(tokenizer, texts: list[str]) -> Examples:
    """Continued pretraining: each document as the tokenizer encodes text (BOS if any), then EOS; loss everywhere."""
    rust, eos = rust_tokenizer(tokenizer), eos_id(tokenizer)
    return Examples.from_lists([e.ids + [eos] for e in rust.encode_batch_fast(texts)])


def tokenize_records(task_type: TaskType, tokenizer, records: list[Record]) -> Examples:
    if task_type is TaskType.CHAT_COMPLETION:
        return tokenize_chats(tokenizer, [r.data["messages"] for r in records], [r.where for r in records])
    if task_type is TaskType.INSTRUCTION_FINETUNE:
        answers = [r.data["response"] if "response" in r.data else r.data["completion"] for r in records]
        return tokenize_instructions(tokenizer, [r.data["prompt"] for r in records], answers)
    return tokenize_documents(tokenizer, [r.data["text"] for r in records])
