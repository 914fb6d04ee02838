"""Generating as the model was trained: chats rendered with its own chat template, decoding that stops at its
end-of-turn token. The endpoint (tasks.serve) and the trainer's greedy answers (generate) render and stop alike.

The end-of-turn token is read from the template itself (stop_token_ids): it is often not the tokenizer's
EOS (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`), and a model that is only stopped at EOS never stops.
Data prep trains the same token at the end of every assistant turn (tasks.prepare.tokenizing.assistant_spans).
"""

from __future__ import annotations

from collections.abc import Iterable

# a conversation to render to see how the template ends an assistant turn (plain words: no template alters them)
_PROBE = [{"role": "user", "content": "tessera probe question"}, {"role": "assistant", "content": "tessera probe answer"}]


def end_of_turn(text: str, start: int, tokens: Iterable[str]) -> tuple[int, str] | None:
    """The first of `tokens` (a tokenizer's special and added tokens) in `text` at or after `start`, and where it
    is: right after an assistant message's content, the token the chat template ends the turn with. At one
    position the longest token wins (a token over another that is its prefix)."""
    hits = [(at, -len(t), t) for t in tokens if (at := text.find(t, start)) >= 0]
    if not hits:
        return None
    at, _, token = min(hits)
    return at, token


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The ids that end an assistant turn, deduplicated, in this order: the token the chat template puts right
    after an assistant message's content, the tokenizer's EOS, then whatever `generation_config.eos_token_id`
    lists (an int or a list). Without a chat template: EOS and generation_config's. The trainer saves this list
    as the model's generation_config.eos_token_id, so any runtime that honours it stops there too."""
    ids = [_template_end_token(tokenizer) if tokenizer.chat_template else None, tokenizer.eos_token_id]
    configured = getattr(generation_config, "eos_token_id", None)
    ids += [configured] if isinstance(configured, int) else configured or []
    return list(dict.fromkeys(i for i in ids if i is not None))


def _template_end_token(tokenizer) -> int | None:
    """The first special or added token after the assistant's reply in a probe chat rendered by the template."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except TemplateError:  # it cannot render the plainest chat, so it is never used for one (data prep refuses it)
        return None
    answer = _PROBE[-1]["content"]
    at = text.rfind(answer)
    added = tokenizer.get_added_vocab()
    found = end_of_turn(text, at + len(answer), added) if at >= 0 else None
    return added[found[1]] if found else None


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A chat (a list of messages) through the model's chat template with the assistant turn opened;
    plain text as the tokenizer encodes text (instruction and pretraining models have no template)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def generate(model, tokenizer, prompts: list[list[int]], max_tokens: int,
             synced_ranks: bool = False) -> list[tuple[list[int], str]]:
    """For each prompt (token ids), its greedy answer's new token ids and finish reason: 'stop' when the model ended
    its turn (on any of stop_token_ids, which is then left out of the ids), else 'length'.

    The prompts are answered together, as one batch padded on the left (a masked pad takes no part in attention,
    and positions count from each prompt's first token): a batch of n costs about one answer's steps, not n times
    them. The stop ids are worked out here from the tokenizer and `model.generation_config` (what the trainer saved),
    not taken from the caller, so every caller stops the same way, also on a model saved without them.
    `synced_ranks`: every rank of a sharded model runs this together, each forward a collective, until all are done."""
    import torch

    if not prompts:
        return []
    stop = stop_token_ids(tokenizer, model.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    width = max(len(ids) for ids in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            pad_token_id=pad,
            eos_token_id=stop,
            use_cache=True,
            do_sample=False,
            synced_gpus=synced_ranks,
        )
    answers = []
    for new in out[:, width:].tolist():
        ended = next((i for i, token in enumerate(new) if token in stop), None)  # what follows is the batch's padding
        answers.append((new, "length") if ended is None else (new[:ended], "stop"))
    return answers
