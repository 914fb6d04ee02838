"""Local files and folders (a path in a volume, or any local path): checking that one can serve the task, and
reading a JSONL file. How a folder's documents are listed and a file is hashed is in files.py, below Source,
which needs them too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from tessera.core.config import TaskType
from tessera.core.errors import DataValidationError, TesseraError
from tessera.core.paths import resolve_data_path
from tessera.core.sources.files import document_name, text_files
from tessera.core.sources.source import BadRecord, Record, Source, decode_units

_TABLES = "a Delta table (catalog.schema.table) or a dataset split (org/name/split)"
ACCEPTED = {
    TaskType.CHAT_COMPLETION: f"a .jsonl file, {_TABLES}",
    TaskType.INSTRUCTION_FINETUNE: f"a .jsonl file, {_TABLES}",
    TaskType.CONTINUED_PRETRAIN: f"a folder of .txt files, {_TABLES}",
}


def resolve_local(path: str, task_type: TaskType) -> Source:
    local = resolve_data_path(path)
    if not local.exists():
        raise TesseraError(f"{path}: no such file or directory")
    if task_type is TaskType.CONTINUED_PRETRAIN:
        if not local.is_dir():
            raise TesseraError(f"{path}: is a file; {task_type.value} data must be {ACCEPTED[task_type]}")
        files, _ = text_files(local, path)
        if not files:
            raise TesseraError(f"{path}: no .txt files in this folder or its subfolders")
        empty = [f"{document_name(path, rel)}: file is empty" for rel, file in files if file.stat().st_size == 0]
        if empty:  # refused here, as Spark's file listing would silently skip them
            raise DataValidationError(empty, examples_checked=len(files))
        return Source(path=path, kind="text_folder", location=str(local))
    if local.is_dir():
        raise TesseraError(f"{path}: is a folder; {task_type.value} data must be {ACCEPTED[task_type]}")
    if local.suffix != ".jsonl":
        raise TesseraError(
            f"{path}: {task_type.value} data must be {ACCEPTED[task_type]}, not a '{local.suffix or 'no extension'}' file"
        )
    if local.stat().st_size == 0:
        raise TesseraError(f"{path}: file is empty")
    return Source(path=path, kind="jsonl", location=str(local))


def jsonl_records(source: Source, name: Callable[[int], str]) -> Iterator[Record | BadRecord]:
    with open(source.location, "rb") as f:
        yield from decode_units(source, f, name)
