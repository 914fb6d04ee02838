"""Tables and datasets: which column feeds which record field (checked once, against the schema), and rows read
as bounded Arrow batches. Shared by Delta tables, dataset splits and Spark.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from tessera.core.config import TaskType
from tessera.core.errors import TesseraError

if TYPE_CHECKING:
    import pyarrow as pa

BATCH_ROWS = 1024  # rows per Arrow batch read in-process: bounds memory whatever the table's size


def record_fields(schema: pa.Schema, task_type: TaskType, display: str, text_column: str) -> dict[str, str]:
    """Which column feeds which record field; refuses, once and up front, columns that cannot hold the records."""
    import pyarrow as pa

    types = {f.name: f.type for f in schema}
    problems: list[str] = []

    def is_string(t: pa.DataType) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)

    def is_messages(t: pa.DataType) -> bool:
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)):
            return False
        item = t.value_type
        return pa.types.is_struct(item) and all(
            item.get_field_index(k) >= 0 and is_string(item.field(k).type) for k in ("role", "content")
        )

    def need(column: str, ok, expected: str) -> None:
        if column not in types:
            problems.append(f"no column '{column}' (columns: {', '.join(types) or 'none'})")
        elif not ok(types[column]):
            problems.append(f"column '{column}' must be {expected}, not {types[column]}")

    if task_type is TaskType.CHAT_COMPLETION:
        need("messages", is_messages, "array<struct<role: string, content: string>>")
        fields = {"messages": "messages"}
    elif task_type is TaskType.INSTRUCTION_FINETUNE:
        need("prompt", is_string, "string")
        answers = [c for c in ("response", "completion") if c in types]
        if len(answers) == 1:
            need(answers[0], is_string, "string")
        else:
            problems.append(
                "needs a 'response' or a 'completion' column, not both" if answers
                else f"no column 'response' (or 'completion') (columns: {', '.join(types) or 'none'})"
            )
        fields = {"prompt": "prompt", **{a: a for a in answers[:1]}}
    else:
        need(text_column, is_string, "string")
        fields = {"text": text_column}
    if problems:
        raise TesseraError(f"{display}: {task_type.value} data: " + "; ".join(problems))
    return fields


def batches_to_rows(batches: Iterable[pa.RecordBatch]) -> Iterator[dict]:
    for batch in batches:
        yield from batch.to_pylist()
