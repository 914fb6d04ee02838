"""The chat, instruction and pretraining-text rules, one by one, and how bad records are reported."""

import pytest

from tessera.core.config import TaskType
from tessera.core.errors import ConfigError, DataValidationError, TesseraError
from tessera.core.records import chat_errors, instruction_errors, record_errors, supports_system_role, text_errors, valid_records

from conftest import chat, write_jsonl


def test_a_valid_conversation_has_no_errors():
    assert chat_errors(chat("hi", "hello", "how are you?", "fine", system="be brief")) == []


@pytest.mark.parametrize(
    "messages,expected",
    [
        ([{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}], "messages[0].role: 'bot' is not one of"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
         "messages[1].role: 'system' is only allowed as the first message"),
        ([{"role": "user", "content": "q"}], "needs at least one 'assistant' message"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
         "the last message must be 'assistant'"),
        ([{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}],
         "messages[1].role: two 'user' messages in a row"),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "must start with 'user'"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "messages[0].content: expected a string, got int"),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], "messages[0]: missing field 'content'"),
        ([{"content": "q"}, {"role": "assistant", "content": "a"}], "messages[0]: missing field 'role'"),
        (["hello", {"role": "assistant", "content": "a"}], "messages[0]: expected an object"),
        ([], "'messages': is empty"),
    ],
)
def test_each_chat_rule(messages, expected):
    errors = chat_errors({"messages": messages})
    assert any(expected in e for e in errors), errors


def test_messages_field_missing_or_wrong_type():
    assert "missing field 'messages'" in chat_errors({"prompt": "x"})[0]
    assert "expected a list of messages, got str" in chat_errors({"messages": "hi"})[0]


def test_system_refused_when_the_template_has_no_system_role():
    record = chat("q", "a", system="s")
    assert chat_errors(record, allow_system=True) == []
    assert "no system role" in chat_errors(record, allow_system=False)[0]


MISTRAL_STYLE = (  # refuses a system message, as the Mistral family's templates do
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def with_template(tokenizer, template):
    copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    copy.chat_template = template
    return copy


def test_system_role_detection(tokenizer):
    assert supports_system_role(tokenizer)
    assert not supports_system_role(with_template(tokenizer, MISTRAL_STYLE))
    dropped = "{% for m in messages if m['role'] != 'system' %}{{ m['content'] + eos_token }}{% endfor %}"
    assert not supports_system_role(with_template(tokenizer, dropped))


def test_a_model_without_a_chat_template_is_no_chat_model(tokenizer):
    with pytest.raises(ConfigError, match=r"model .*tiny-chat: has no chat template, so it cannot be trained on CHAT_COMPLETION"):
        supports_system_role(with_template(tokenizer, None))


def test_a_template_that_fails_on_a_plain_chat_is_not_read_as_no_system_role(tokenizer):
    broken = "{{ raise_exception('tool definitions are required') }}"
    with pytest.raises(ConfigError, match="its chat template cannot render a plain user/assistant chat: tool definitions are required"):
        supports_system_role(with_template(tokenizer, broken))


def test_instruction_rules():
    assert instruction_errors({"prompt": "p", "response": "r"}) == []
    assert instruction_errors({"prompt": "p", "completion": "r"}) == []
    assert "missing field 'prompt'" in instruction_errors({"response": "r"})[0]
    assert "missing field 'response'" in instruction_errors({"prompt": "p"})[0]
    assert "field 'response': is empty" in instruction_errors({"prompt": "p", "response": "  "})[0]
    assert "field 'prompt': expected a string, got list" in instruction_errors({"prompt": ["p"], "response": "r"})[0]
    assert "both" in instruction_errors({"prompt": "p", "response": "r", "completion": "c"})[0]


def test_text_rules():
    assert text_errors({"text": "a document"}) == []
    assert text_errors({"body": "x"}) == ["missing field 'text' (found: body)"]
    assert text_errors({"text": ["a", "b"]}) == ["field 'text': expected a string, got list"]
    assert text_errors({"text": None}) == ["field 'text': expected a string, got null"]
    assert text_errors({"text": " \n "}) == ["field 'text': is empty"]


def test_nulls_from_tables_are_named_null():
    assert instruction_errors({"prompt": None, "response": "r"}) == ["field 'prompt': expected a string, got null"]
    assert chat_errors({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}) == [
        "messages[0].content: expected a string, got null"
    ]
    assert chat_errors({"messages": [None]}) == ["messages[0]: expected an object with 'role' and 'content', got null"]


def test_each_task_has_its_rules():
    assert record_errors(chat("q", "a"), TaskType.CHAT_COMPLETION) == []
    assert record_errors({"prompt": "p", "response": "r"}, TaskType.INSTRUCTION_FINETUNE) == []
    assert record_errors({"text": "t"}, TaskType.CONTINUED_PRETRAIN) == []
    assert record_errors({"text": "t"}, TaskType.CHAT_COMPLETION)[0].startswith("missing field 'messages'")
    assert record_errors(chat("q", "a"), TaskType.CONTINUED_PRETRAIN)[0].startswith("missing field 'text'")


def test_bad_lines_are_reported_as_path_line_message(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        chat("q", "a"),
        "{not json",
        "[1, 2]",
        {"messages": [{"role": "user", "content": "only a question"}]},
        chat("q", "a"),
    ])
    with pytest.raises(DataValidationError) as info:
        list(valid_records(str(path), TaskType.CHAT_COMPLETION))
    errors = info.value.errors
    assert errors[0].startswith(f"{path}:2: not valid JSON")
    assert errors[1] == f"{path}:3: expected a JSON object, got list"
    assert errors[2].startswith(f"{path}:4: field 'messages': needs at least one 'assistant'")
    assert len(errors) == 3


def test_not_utf8_is_reported_with_its_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b'{"messages": []}\n{"messages": "\xff\xfe"}\n')
    with pytest.raises(DataValidationError) as info:
        list(valid_records(str(path), TaskType.CHAT_COMPLETION))
    assert any(e.startswith(f"{path}:2: not valid UTF-8") for e in info.value.errors)


def test_only_the_first_20_errors_are_shown_then_a_count(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", ["nope"] * 25)
    with pytest.raises(DataValidationError) as info:
        list(valid_records(str(path), TaskType.CHAT_COMPLETION))
    message = str(info.value)
    assert f"{path}:20:" in message and f"{path}:21:" not in message
    assert "and 5 more error(s)" in message


@pytest.mark.parametrize("name,content,expected", [
    ("chat.txt", "{}", "must be a .jsonl file, a Delta table .* not a '.txt' file"),
    ("empty.jsonl", "", "file is empty"),
    ("missing.jsonl", None, "no such file"),
])
def test_wrong_files_are_refused_up_front(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(TesseraError, match=expected):
        list(valid_records(str(path), TaskType.CHAT_COMPLETION))


def test_named_errors_reads_only_as_far_as_the_last_error(tmp_path, monkeypatch):
    """With a cluster, Spark counts the bad records and this pass names them: it stops at the last one."""
    import tessera.core.records as records
    from tessera.core.records import named_errors
    from tessera.core.sources import resolve_source

    path = write_jsonl(tmp_path / "chat.jsonl", [chat("q", "a"), "{oops", chat("q", "a"), {"messages": []}] + [chat("q", "a")] * 50)
    source = resolve_source(str(path), TaskType.CHAT_COMPLETION)
    pulled = []
    real = records.read_records
    monkeypatch.setattr(records, "read_records", lambda s: (pulled.append(r) or r for r in real(s)))
    assert named_errors(source, TaskType.CHAT_COMPLETION, True, expected=2) == [
        f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:4: field 'messages': is empty",
    ]
    assert len(pulled) == 4
