"""Reading training records and the rules they must follow: one implementation for validator and trainer.

Records come from tessera.core.sources; each carries `where` (`path:line`, a `.txt` file's path, or
`table@v3 row 17`), so every error names the exact place a user has to fix, down to the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tessera.core.config import TaskType
from tessera.core.errors import ConfigError, DataValidationError, TesseraError
from tessera.core.sources import BadRecord, Record, Source, read_records, resolve_source

ROLES = ("system", "user", "assistant")


def supports_system_role(tokenizer) -> bool:
    """Whether the model's chat template renders a system message. The Mistral family's refuse one (their
    template raises) or drop it: the model has no system role, and chat_errors refuses system messages.

    Any other failure is no answer about roles: a model without a chat template, or one whose template
    cannot render a plain user/assistant chat, cannot be trained on chats at all (a ConfigError naming it).
    """
    from jinja2 import TemplateError

    model, plain = tokenizer.name_or_path, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    if not tokenizer.chat_template:
        raise ConfigError(
            f"model {model}: has no chat template, so it cannot be trained on {TaskType.CHAT_COMPLETION.value} data; "
            f"use a model with one, or {TaskType.INSTRUCTION_FINETUNE.value} data (prompt/response pairs)"
        )
    try:
        tokenizer.apply_chat_template(plain, tokenize=False)
    except TemplateError as exc:
        raise ConfigError(f"model {model}: its chat template cannot render a plain user/assistant chat: {exc}") from None
    probe = "tessera-system-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": probe}, *plain], tokenize=False)
    except TemplateError:  # raised only now that there is a system message: the template refuses that role
        return False
    return probe in text


def _type(value) -> str:
    """A value's type as a message names it: None (JSON null, a table's NULL) is 'null'."""
    return "null" if value is None else type(value).__name__


def chat_errors(data: dict, allow_system: bool = True) -> list[str]:
    """Every way a `{"messages": [...]}` record breaks the chat rules (the managed service's, in ../shared/DESIGN.md, "Inputs")."""
    if "messages" not in data:
        return [f"missing field 'messages' (found: {', '.join(sorted(data)) or 'nothing'})"]
    messages = data["messages"]
    if not isinstance(messages, list):
        return [f"field 'messages': expected a list of messages, got {_type(messages)}"]
    if not messages:
        return ["field 'messages': is empty"]
    errors = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            errors.append(f"{field}: expected an object with 'role' and 'content', got {_type(m)}")
            continue
        if "role" not in m:
            errors.append(f"{field}: missing field 'role'")
        elif m["role"] not in ROLES:
            errors.append(f"{field}.role: {m['role']!r} is not one of {', '.join(ROLES)}")
        if "content" not in m:
            errors.append(f"{field}: missing field 'content'")
        elif not isinstance(m["content"], str):
            errors.append(f"{field}.content: expected a string, got {_type(m['content'])}")
    if errors:
        return errors
    roles = [m["role"] for m in messages]
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            errors.append(f"messages[{i}].role: 'system' is only allowed as the first message")
        elif role == "system" and not allow_system:
            errors.append("messages[0].role: this model's chat template has no system role")
        if i > 0 and role == roles[i - 1]:
            errors.append(f"messages[{i}].role: two '{role}' messages in a row; roles must alternate")
    if "assistant" not in roles:
        errors.append("field 'messages': needs at least one 'assistant' message")
    elif roles[-1] != "assistant":
        errors.append(f"messages[{len(roles) - 1}].role: the last message must be 'assistant', not {roles[-1]!r}")
    turns = roles[1:] if roles[0] == "system" else roles
    if turns and turns[0] != "user" and not errors:
        errors.append(f"messages[{len(roles) - len(turns)}].role: the conversation must start with 'user'")
    return errors


def instruction_errors(data: dict) -> list[str]:
    """`{"prompt", "response"}` or `{"prompt", "completion"}`, strings, non-empty response."""
    errors = []
    if "prompt" not in data:
        errors.append(f"missing field 'prompt' (found: {', '.join(sorted(data)) or 'nothing'})")
    elif not isinstance(data["prompt"], str):
        errors.append(f"field 'prompt': expected a string, got {_type(data['prompt'])}")
    answer_fields = [k for k in ("response", "completion") if k in data]
    if not answer_fields:
        errors.append("missing field 'response' (or 'completion')")
    elif len(answer_fields) == 2:
        errors.append("has both 'response' and 'completion'; use one")
    else:
        key = answer_fields[0]
        if not isinstance(data[key], str):
            errors.append(f"field '{key}': expected a string, got {_type(data[key])}")
        elif not data[key].strip():
            errors.append(f"field '{key}': is empty")
    return errors


def text_errors(data: dict) -> list[str]:
    """`{"text"}`: one CONTINUED_PRETRAIN document, a non-empty string."""
    if "text" not in data:
        return [f"missing field 'text' (found: {', '.join(sorted(data)) or 'nothing'})"]
    if not isinstance(data["text"], str):
        return [f"field 'text': expected a string, got {_type(data['text'])}"]
    if not data["text"].strip():
        return ["field 'text': is empty"]
    return []


def record_errors(data: dict, task_type: TaskType, allow_system: bool = True) -> list[str]:
    if task_type is TaskType.CHAT_COMPLETION:
        return chat_errors(data, allow_system)
    if task_type is TaskType.INSTRUCTION_FINETUNE:
        return instruction_errors(data)
    return text_errors(data)


class RecordCheck:
    """The task's rules applied to records as they stream past, in-process or on a Spark executor: every error
    is kept (`where: message`), and records are passed on only until the first one (nothing after it gets
    tokenized)."""

    def __init__(self, task_type: TaskType, allow_system: bool = True):
        self.task_type, self.allow_system = task_type, allow_system
        self.errors: list[str] = []
        self.count = 0

    def valid(self, records: Iterable[Record | BadRecord]) -> Iterator[Record]:
        for rec in records:
            self.count += 1
            if isinstance(rec, BadRecord):
                problems = [rec.message]
            else:
                problems = record_errors(rec.data, self.task_type, self.allow_system)
            self.errors.extend(f"{rec.where}: {p}" for p in problems)
            if not self.errors:
                yield rec

    def raise_if_invalid(self, display: str) -> None:
        if self.errors:
            raise DataValidationError(self.errors, examples_checked=self.count)
        if self.count == 0:
            raise TesseraError(f"{display}: contains no records")


def named_errors(source: Source, task_type: TaskType, allow_system: bool, expected: int) -> list[str]:
    """The errors of `source` named as in-process reading names them (`path:line`, `table@v3 row 17`), read
    until `expected` are found. Spark counts its partitions' errors, but partitions come in no fixed order
    (Sail's even change from run to run), so only a pass in order can say where each one is."""
    check = RecordCheck(task_type, allow_system)

    def up_to_the_last_error(records):
        for rec in records:
            yield rec  # check.valid takes its errors before asking for the next one
            if len(check.errors) >= expected:
                return

    for _ in check.valid(up_to_the_last_error(read_records(source))):
        pass
    return check.errors


def valid_records(source: Source | str, task_type: TaskType, allow_system: bool = True) -> Iterator[Record]:
    """Yield the valid records; after the last one, raise DataValidationError if any record was bad."""
    if isinstance(source, str):
        source = resolve_source(source, task_type)
    check = RecordCheck(task_type, allow_system)
    yield from check.valid(read_records(source))
    check.raise_if_invalid(source.display)
