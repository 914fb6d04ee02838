"""What every kind of source shares: the Source a data path resolves to, the Record and BadRecord read from it,
the patterns that name a table or a dataset split, the one decoder of input units into records (in-process
readers and Spark executors both use it, so the same data gives the same records and messages), and how an
engine's failure while reading is reported.

Below every module of the package but files.py: each kind's module builds Sources, decodes and reports with this.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tessera.core.errors import TesseraError
from tessera.core.sources.files import hash_file, text_files

_IDENT = r"[A-Za-z_][A-Za-z0-9_-]*"
TABLE_NAME = re.compile(rf"^(?P<name>{_IDENT}\.{_IDENT}\.{_IDENT})(?:@v?(?P<version>\d+))?$")
DATASET_SPLIT = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)/(?P<split>\w+)$")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


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
    kind: Literal["jsonl", "text_folder", "delta", "hf_dataset"]
    location: str  # the local file or folder, the table location, or the dataset split's directory
    version: int | str | None = None  # the Delta table version pinned for this run, or the dataset's fingerprint
    split: str | None = None  # the dataset split
    fields: dict[str, str] | None = None  # record field -> the table or dataset column it is read from

    @property
    def display(self) -> str:
        """How messages name the source: a table with its pinned version (`main.sales.chats@v3`, itself a
        data path that reads exactly that version again), anything else as written."""
        return f"{TABLE_NAME.match(self.path)['name']}@v{self.version}" if self.kind == "delta" else self.path

    def fingerprint(self) -> str:
        """Changes whenever the content may have: the prepared-data cache is keyed on it.

        Files are hashed; a table or dataset is named by location and version, which is cheap and
        exact (a Delta version never changes; a dataset's fingerprint changes with its content).
        """
        h = hashlib.sha256()
        if self.kind == "jsonl":
            hash_file(h, Path(self.location))
        elif self.kind == "text_folder":
            for rel, file in text_files(Path(self.location), self.path)[0]:
                h.update(f"{rel}\0{file.stat().st_size}\0".encode())
                hash_file(h, file)
        else:
            h.update(json.dumps([self.kind, self.location, self.version, self.split, self.fields]).encode())
        return h.hexdigest()

    def skipped_files(self) -> dict[str, int]:
        """A text folder's files that are not documents, counted by reason (the data report shows them);
        listed afresh, as they take no part in the fingerprint. {} for any other source."""
        return text_files(Path(self.location), self.path)[1] if self.kind == "text_folder" else {}

    def lineage(self) -> dict[str, str]:
        """Params recorded on the MLflow run so a model can be traced to the exact data it saw."""
        out = {"source.path": self.path, "source.kind": self.kind, "source.location": self.location}
        if self.version is not None:
            out["source.version"] = str(self.version)
        if self.split is not None:
            out["source.split"] = self.split
        if self.fields:
            out["source.columns"] = ",".join(f"{f}={c}" if f != c else c for f, c in self.fields.items())
        return out


def decode_units(source: Source, units: Iterable, name: Callable[[int], str | int]) -> Iterator[Record | BadRecord]:
    """Input units to records: JSONL lines (bytes), `(file name, bytes)` documents, or table rows (dicts).
    `name(k)` is the `where` of the k-th unit (a document is named by its file)."""
    for k, unit in enumerate(units):
        if source.kind == "jsonl":
            record = _json_record(name(k), unit)
            if record is not None:
                yield record
        elif source.kind == "text_folder":
            yield _document(*unit)
        else:
            yield Record(name(k), {field: unit[column] for field, column in source.fields.items()})


def _json_record(where: str | int, raw: bytes) -> Record | BadRecord | None:
    """One JSONL line; None for a blank line."""
    try:
        line = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(where, f"not valid UTF-8 (byte {exc.start})")
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadRecord(where, f"not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(data, dict):
        return BadRecord(where, f"expected a JSON object, got {type(data).__name__}")
    return Record(where, data)


def _document(where: str, content: bytes) -> Record | BadRecord:
    """One text file: `{"text": content}`; an empty or undecodable file is a BadRecord."""
    try:
        text = bytes(content).decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(where, f"not valid UTF-8 (byte {exc.start})")
    if not text.strip():
        return BadRecord(where, "file is empty")
    return Record(where, {"text": text})


@contextmanager
def reading(source: Source, engine: str):
    """Engine failures mid-read (a file gone, a connection lost) become one message naming the source."""
    try:
        yield
    except TesseraError:
        raise
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # a Spark worker's failure comes as its traceback, whose last line says what went wrong
        cause = lines[-1] if "Traceback (most recent call last):" in lines else lines[0]
        raise TesseraError(f"{source.display}: reading it ({engine}) failed: {cause}") from exc
