"""Stopping where the template stops: a model whose chat template ends a turn with `<|end_of_turn|>`, which is
not its EOS token, is trained on that token at the end of every assistant turn and stops generating on it."""

from itertools import chain, repeat

import pytest
import torch
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tasks.prepare.rows import read_rows
from tasks.prepare.stage import prepare
from tasks.prepare.tokenizing import tokenize_chats, tokenize_instructions
from tessera.core.config import build_run_config
from tessera.core.generation import generate, stop_token_ids
from tessera.core.training import IGNORE_INDEX

from conftest import EOS, EOT, chat, write_jsonl


@pytest.fixture(scope="module")
def model_dir(eot_model_dir):
    return eot_model_dir


@pytest.fixture(scope="module")
def eot_tokenizer(model_dir):
    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def test_stop_tokens_are_the_templates_end_of_turn_eos_and_the_configured_ones(eot_tokenizer, tokenizer):
    eot, eos = eot_tokenizer.convert_tokens_to_ids([EOT, EOS])
    assert eot != eos and eot_tokenizer.eos_token_id == eos
    assert stop_token_ids(eot_tokenizer) == [eot, eos]
    assert stop_token_ids(eot_tokenizer, GenerationConfig(eos_token_id=[eos, 7])) == [eot, eos, 7]
    assert stop_token_ids(eot_tokenizer, GenerationConfig(eos_token_id=7)) == [eot, eos, 7]
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]  # tiny-chat ends its turns with its EOS
    eot_tokenizer = PreTrainedTokenizerFast.from_pretrained(eot_tokenizer.name_or_path)
    eot_tokenizer.chat_template = None
    assert stop_token_ids(eot_tokenizer, GenerationConfig(eos_token_id=7)) == [eos, 7]


def test_every_assistant_turn_is_trained_through_its_end_of_turn_token(eot_tokenizer):
    ex = tokenize_chats(eot_tokenizer, [chat("what is two and two", "it is four", "and two", "four")["messages"]])
    ids, labels = ex.ids.tolist(), ex.labels.tolist()
    trained = eot_tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained == f"it is four{EOT}four{EOT}"
    eot = eot_tokenizer.convert_tokens_to_ids(EOT)
    assert [label for t, label in zip(ids, labels) if t == eot] == [IGNORE_INDEX, eot, IGNORE_INDEX, eot]  # users' ends are not
    instruction = tokenize_instructions(eot_tokenizer, ["what is two and two "], ["four"])
    assert instruction.labels[-1] == eot_tokenizer.eos_token_id  # prompt/response data still ends in EOS


def test_prepared_rows_train_the_end_of_turn_token(home, model_dir):
    path = write_jsonl(home / "chat.jsonl", [chat(f"question {i}", f"answer {i}", "and", "two") for i in range(6)])
    prepared = prepare(build_run_config(model=str(model_dir), train_data_path=str(path), register_to="main.t"))
    eot = PreTrainedTokenizerFast.from_pretrained(model_dir).convert_tokens_to_ids(EOT)
    labels = [label for part in read_rows(prepared.path) for label in part.labels.tolist()]
    assert labels.count(eot) == 12  # two assistant turns in each of six chats


def forcing(model, tokens: list[int]) -> None:
    """Make the model emit `tokens`, one per forward pass, then the last of them forever."""
    upcoming = chain(tokens, repeat(tokens[-1]))

    def hook(module, inputs, logits):
        forced = torch.zeros_like(logits)
        forced[..., next(upcoming)] = 1.0
        return forced

    model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("emitted,expected", [
    (["it", EOT, "four"], (["it"], "stop")),  # the template's end of turn, though generation_config says EOS
    ([EOS], ([], "stop")),
    (["it"], (["it", "it", "it"], "length")),
])
def test_generate_stops_on_every_stop_token(model_dir, eot_tokenizer, emitted, expected):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    assert model.generation_config.eos_token_id == eot_tokenizer.eos_token_id
    forcing(model, eot_tokenizer.convert_tokens_to_ids(emitted))
    [(new, finish)] = generate(model, eot_tokenizer, [eot_tokenizer("question")["input_ids"]], max_tokens=3)
    assert (eot_tokenizer.convert_ids_to_tokens(new), finish) == expected


def test_generate_stops_on_what_generation_config_adds(model_dir, eot_tokenizer):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    other = eot_tokenizer.convert_tokens_to_ids("<|start|>")
    model.generation_config.eos_token_id = [eot_tokenizer.eos_token_id, other]
    forcing(model, [eot_tokenizer.convert_tokens_to_ids("it"), other])
    assert generate(model, eot_tokenizer, [[5, 6]], max_tokens=5) == [([eot_tokenizer.convert_tokens_to_ids("it")], "stop")]


def test_prompts_answered_together_get_the_answers_each_gets_alone(tiny_model_dir, tokenizer):
    """generate() pads a batch of prompts on the left: each answer must be the one the prompt gets on its own (fp32),
    the longest and the shortest prompt alike."""
    from transformers import AutoModelForCausalLM

    from tessera.core.generation import prompt_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": text}])
               for text in ("a", "a much longer question than the others, with many more words in it", "two and two")]
    alone = [generate(model, tokenizer, [p], max_tokens=12)[0] for p in prompts]
    assert len({len(p) for p in prompts}) == 3
    assert generate(model, tokenizer, prompts, max_tokens=12) == alone
