"""Generating as the model was trained: chats rendered with its own chat template, decoding that stops at its
end-of-turn token. One implementation for the served endpoint and the trainer's eval prompts."""

from __future__ import annotations


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A chat (a list of messages) through the model's chat template with the assistant turn opened;
    plain text as the tokenizer encodes text (instruction and pretraining models have no template)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def generate(model, tokenizer, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> tuple[list[int], str]:
    """New token ids and the finish reason ('stop' at the end-of-turn token, else 'length'); greedy at temperature 0."""
    import torch

    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids], device=model.device),
            max_new_tokens=max_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **sampling,
        )
    new = out[0, len(ids):].tolist()
    if new and new[-1] == tokenizer.eos_token_id:
        return new[:-1], "stop"
    return new, "length"
