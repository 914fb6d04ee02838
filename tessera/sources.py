"""Where training data comes from: a user's data path resolved to a Source, and its records read in a stream.

Every up-front refusal (missing, empty, wrong kind of input, a path outside its volume) happens in
resolve_source, before any work starts. read_records never loads a whole input into memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tessera.config import TaskType
from tessera.errors import TesseraError
from tessera.paths import resolve_data_path


@dataclass(frozen=True)
class Record:
    where: str
    data: dict


@dataclass(frozen=True)
class BadRecord:
    where: str
    message: str


class Source(BaseModel):
    """A resolved input: what the user wrote, what it points at, and the version read (for lineage)."""

    path: str  # as the user wrote it; used in every message
    kind: Literal["jsonl"]
    location: str  # the local file, table URI or dataset directory behind it
    version: int | None = None  # e.g. the Delta table version pinned for this run

    def fingerprint(self) -> str:
        """Changes whenever the content may have: the prepared-data cache is keyed on it."""
        h = hashlib.sha256()
        with open(self.location, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def lineage(self) -> dict[str, str]:
        """Params recorded on the MLflow run so a model can be traced to the exact data it saw."""
        out = {"source.kind": self.kind, "source.location": self.location}
        if self.version is not None:
            out["source.version"] = str(self.version)
        return out


def resolve_source(path: str, task_type: TaskType) -> Source:
    local = resolve_data_path(path)
    if not local.exists():
        raise TesseraError(f"{path}: no such file or directory")
    if local.is_dir():
        raise TesseraError(f"{path}: is a directory; {task_type.value} data must be a .jsonl file")
    if local.suffix != ".jsonl":
        raise TesseraError(f"{path}: {task_type.value} data must be a .jsonl file, not '{local.suffix or 'no extension'}'")
    if local.stat().st_size == 0:
        raise TesseraError(f"{path}: file is empty")
    return Source(path=path, kind="jsonl", location=str(local))


def read_records(source: Source, task_type: TaskType) -> Iterator[Record | BadRecord]:
    return read_jsonl(Path(source.location), source.path)


def read_jsonl(path: Path, display: str) -> Iterator[Record | BadRecord]:
    """Stream a JSONL file line by line; blank lines are skipped, every broken line is reported."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{display}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield BadRecord(where, f"not valid UTF-8 (byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadRecord(where, f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(data, dict):
                yield BadRecord(where, f"expected a JSON object, got {type(data).__name__}")
                continue
            yield Record(where, data)
