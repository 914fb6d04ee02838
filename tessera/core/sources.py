"""Where training data comes from: a user's data path resolved to a Source, and its records read in a stream.

How a data path is read (the first rule that matches wins):

1. `dbfs:/Volumes/<catalog>/<schema>/<volume>/...` or `/Volumes/...`: a file or folder in a volume
   (tessera.core.paths maps it under the volumes root and refuses paths that leave their volume).
2. Any other `<scheme>:` prefix (`s3://`, `dbfs:/FileStore/...`): refused; reach object storage
   through a volume or a table location in the catalog config.
3. An absolute path, `~...`, `./...`, `../...`, or any path that exists locally: a local file or folder.
4. `<catalog>.<schema>.<table>`, optionally `@v<N>` (three identifiers, no slash): a Delta table.
5. `<name>/<split>` or `<org>/<name>/<split>`, the split a plain word (`train`, `test_sft`): a
   Hugging Face dataset split.
6. Anything else: a local path, which then does not exist.

What each task accepts (DESIGN §4): CHAT_COMPLETION and INSTRUCTION_FINETUNE take a `.jsonl` file, a
Delta table or a dataset split; CONTINUED_PRETRAIN takes a folder searched recursively for `.txt`
files (one document each, whatever its name: `_thread.txt` is one; only hidden files and folders, with a
leading `.`, and files that are not `.txt` are skipped, each counted by reason for the data report; links
to folders are not followed), a Delta table or a dataset split with a text column
(`text` unless `text_column` says otherwise). Every refusal that can be made up front (missing,
empty, wrong kind of input, wrong columns, outside its volume) happens in resolve_source.

Delta tables. `catalog.schema.table` is found at the location the catalog config maps it to (a YAML
file, `$TESSERA_CATALOG_CONFIG` or `$TESSERA_HOME/catalog.yaml`: `tables: {main.sales.chats:
s3://bucket/chats}`; relative paths are relative to that file), else at
`<warehouse>/<catalog>/<schema>/<table>` (`$TESSERA_WAREHOUSE_ROOT`, default `$TESSERA_HOME/warehouse`).
The version read is pinned when the source is resolved: the one the user names (`main.sales.chats@v3`
or `version=3`), else the latest; Source.version records it, so lineage and the prepared-data cache
name exactly the data trained on. A bad row is reported as `main.sales.chats@v3 row 17`: rows count
from 0 in the order the engine reads the pinned version (stable for that version and engine).

Hugging Face datasets. `org/name/split` is read from a local dataset directory first,
`<datasets root>/org/name/<split>` as `DatasetDict.save_to_disk` (or `Dataset.save_to_disk` per split)
writes it (`$TESSERA_DATASETS_ROOT`, default `$TESSERA_HOME/datasets`), else through the `datasets`
library's cache (as `load_dataset` finds it; offline when HF_DATASETS_OFFLINE=1). A bad row is
`org/name/split row 17`, the index `dataset[17]` finds. Source.version holds the dataset's fingerprint.

Engines. Without a cluster everything is read in-process (pyarrow, deltalake, datasets), in bounded
batches (read_records). With `cluster` (RunConfig.data_prep_cluster_id: `sc://host:port` for Spark
Connect, or a master URL such as `local[2]` or `spark://host:7077`) Spark reads files and tables (at
locations its executors can see: spark_input) and its executors decode their partitions with the same
decoder (spark_partition_records), so the same data gives the same records and messages. A folder's
documents are listed here, not by Spark (whose listing drops every name starting with `_`, even one
named explicitly), and each executor reads the files it is given. Dataset splits are always read
in-process (Spark has no reader for them), and so is table metadata (the pinned version, the schema):
the table location must be readable from here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlparse

import yaml
from pydantic import BaseModel

from tessera.core.catalog import resolve_model
from tessera.core.config import RunConfig, TaskType
from tessera.core.errors import ConfigError, DataValidationError, TesseraError
from tessera.core.paths import is_volume_path, resolve_data_path, tessera_home

if TYPE_CHECKING:
    import pyarrow as pa

_IDENT = r"[A-Za-z_][A-Za-z0-9_-]*"
_TABLE = re.compile(rf"^(?P<name>{_IDENT}\.{_IDENT}\.{_IDENT})(?:@v?(?P<version>\d+))?$")
_DATASET = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)/(?P<split>\w+)$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CLUSTER = re.compile(r"^(sc://.+|local(\[(\d+|\*)(,\d+)?\])?|spark://.+|yarn|k8s://.+)$")

_TABLES = "a Delta table (catalog.schema.table) or a dataset split (org/name/split)"
ACCEPTED = {
    TaskType.CHAT_COMPLETION: f"a .jsonl file, {_TABLES}",
    TaskType.INSTRUCTION_FINETUNE: f"a .jsonl file, {_TABLES}",
    TaskType.CONTINUED_PRETRAIN: f"a folder of .txt files, {_TABLES}",
}
_BATCH_ROWS = 1024  # rows per Arrow batch read in-process: bounds memory whatever the table's size
_DOCUMENTS_PER_PARTITION = 1024  # a folder's documents per Spark partition: executors share the work
_SCAN_CONFIG = {
    "datafusion.execution.batch_size": str(_BATCH_ROWS),
    "datafusion.execution.target_partitions": "1",  # one stream, files in order: row numbers are stable
}


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
        return f"{_TABLE.match(self.path)['name']}@v{self.version}" if self.kind == "delta" else self.path

    def fingerprint(self) -> str:
        """Changes whenever the content may have: the prepared-data cache is keyed on it.

        Files are hashed; a table or dataset is named by location and version, which is cheap and
        exact (a Delta version never changes; a dataset's fingerprint changes with its content).
        """
        h = hashlib.sha256()
        if self.kind == "jsonl":
            _hash_file(h, Path(self.location))
        elif self.kind == "text_folder":
            for rel, file in _text_files(Path(self.location), self.path)[0]:
                h.update(f"{rel}\0{file.stat().st_size}\0".encode())
                _hash_file(h, file)
        else:
            h.update(json.dumps([self.kind, self.location, self.version, self.split, self.fields]).encode())
        return h.hexdigest()

    def skipped_files(self) -> dict[str, int]:
        """A text folder's files that are not documents, counted by reason (the data report shows them);
        listed afresh, as they take no part in the fingerprint. {} for any other source."""
        return _text_files(Path(self.location), self.path)[1] if self.kind == "text_folder" else {}

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


def resolve_source(
    path: str,
    task_type: TaskType,
    *,
    cluster: str | None = None,
    version: int | None = None,
    text_column: str = "text",
) -> Source:
    """Classify `path` (see the module docstring), check it can serve `task_type`, and pin its version.

    `version` pins a Delta table version (same as `@v<N>` in the name); `text_column` is the column
    CONTINUED_PRETRAIN reads from a table or dataset; `cluster` is only checked here (engines start
    when records are read).
    """
    if cluster is not None:
        check_cluster(cluster)
    kind = classify(path)
    if version is not None and kind != "delta":
        raise TesseraError(f"{path}: a version can only be pinned for a Delta table (catalog.schema.table)")
    if kind == "delta":
        return _resolve_table(path, task_type, version, text_column)
    if kind == "hf_dataset":
        return _resolve_dataset(path, task_type, text_column)
    return _resolve_local(path, task_type)


def classify(path: str) -> Literal["local", "delta", "hf_dataset"]:
    """Which kind of input a data path names; the rules, in order, are in the module docstring."""
    if is_volume_path(path):
        return "local"
    if _SCHEME.match(path):
        raise TesseraError(
            f"{path}: unsupported location; use a volume path (/Volumes/<catalog>/<schema>/<volume>/...), "
            "a local path, a Delta table (catalog.schema.table) or a dataset split (org/name/split)"
        )
    if path.startswith(("/", "~", "./", "../")) or Path(path).exists():
        return "local"
    if _TABLE.match(path):
        return "delta"
    if _DATASET.match(path):
        return "hf_dataset"
    return "local"


def check_cluster(cluster: str) -> None:
    if not _CLUSTER.match(cluster):
        raise ConfigError(
            f"data_prep_cluster_id {cluster!r}: expected a Spark Connect URL (sc://host:port) or a Spark "
            "master URL (local[*], local[2], spark://host:7077, yarn, k8s://...)"
        )


def read_records(source: Source) -> Iterator[Record | BadRecord]:
    """Stream a source's records in-process; nothing is loaded whole. (With a cluster, Spark executors
    decode their own partitions with the same decoder: see spark_partition_records.)

    Every record that cannot even be decoded (not UTF-8, not JSON, not an object) is a BadRecord;
    the task's rules are tessera.core.records' job.
    """
    name = partial(position_name, source)
    if source.kind == "jsonl":
        return _jsonl_records(source, name)
    if source.kind == "text_folder":
        files, _ = _text_files(Path(source.location), source.path)
        return decode_units(source, ((document_name(source.path, rel), file.read_bytes()) for rel, file in files), name)
    if source.kind == "delta":
        return decode_units(source, _delta_rows(source), name)
    return decode_units(source, _dataset_rows(source), name)


def position_name(source: Source, position: int) -> str:
    """How messages name the record at a 0-based position: `path:line` in a file (blank lines count, so
    line numbers match an editor's), `table@v3 row 17` in a table or dataset."""
    return f"{source.path}:{position + 1}" if source.kind == "jsonl" else f"{source.display} row {position}"


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


def _jsonl_records(source: Source, name: Callable[[int], str]) -> Iterator[Record | BadRecord]:
    with open(source.location, "rb") as f:
        yield from decode_units(source, f, name)


# --- local files and folders ---------------------------------------------------------------------


def _resolve_local(path: str, task_type: TaskType) -> Source:
    local = resolve_data_path(path)
    if not local.exists():
        raise TesseraError(f"{path}: no such file or directory")
    if task_type is TaskType.CONTINUED_PRETRAIN:
        if not local.is_dir():
            raise TesseraError(f"{path}: is a file; {task_type.value} data must be {ACCEPTED[task_type]}")
        files, _ = _text_files(local, path)
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


def _text_files(folder: Path, path: str) -> tuple[list[tuple[str, Path]], dict[str, int]]:
    """(relative path, file) of every .txt document under `folder`, sorted, and the files skipped, counted
    by reason. Only hidden names (a leading `.`: `.git/`, `.DS_Store`) are skipped; a leading `_` is an
    ordinary name (`_thread.txt`, `_static/`). In a volume, a file that links out of it is refused."""
    found, skipped = [], Counter()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            if d.startswith("."):  # every file inside counts: that is what the user would lose
                skipped["in a hidden folder"] += sum(len(f) for _, _, f in os.walk(Path(root) / d))
            elif (Path(root) / d).is_symlink():  # os.walk does not follow it
                skipped["link to a folder (not followed)"] += 1
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                skipped["hidden file"] += 1
            elif not name.endswith(".txt"):
                skipped["not a .txt file"] += 1
            else:
                rel = (Path(root) / name).relative_to(folder).as_posix()
                if is_volume_path(path):  # a link out of the volume is refused, here, once per file
                    resolve_data_path(document_name(path, rel))
                found.append((rel, Path(root) / name))
    return sorted(found), dict(sorted(skipped.items()))


def document_name(path: str, rel: str) -> str:
    """A document in the folder `path`, named as the user named the folder."""
    return f"{path.rstrip('/')}/{rel}"


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


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


# --- tables and datasets: columns -> record fields -----------------------------------------------


def _columns(schema: pa.Schema, task_type: TaskType, display: str, text_column: str) -> dict[str, str]:
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


def _batches_to_rows(batches: Iterable[pa.RecordBatch]) -> Iterator[dict]:
    for batch in batches:
        yield from batch.to_pylist()


# --- Delta tables --------------------------------------------------------------------------------


def warehouse_root() -> Path:
    return Path(os.environ.get("TESSERA_WAREHOUSE_ROOT", tessera_home() / "warehouse")).expanduser().resolve()


def catalog_config() -> Path | None:
    """The catalog config in force: $TESSERA_CATALOG_CONFIG (which must exist), else $TESSERA_HOME/catalog.yaml if present."""
    if os.environ.get("TESSERA_CATALOG_CONFIG"):
        path = Path(os.environ["TESSERA_CATALOG_CONFIG"]).expanduser()
        if not path.is_file():
            raise TesseraError(f"TESSERA_CATALOG_CONFIG={path}: no such file")
        return path
    path = tessera_home() / "catalog.yaml"
    return path if path.is_file() else None


def table_location(name: str) -> str:
    """Where `catalog.schema.table` lives: the catalog config's entry, else under the warehouse root."""
    config = catalog_config()
    tables = _catalog_tables(config) if config is not None else {}
    if name not in tables:
        return str(warehouse_root().joinpath(*name.split(".")))
    location = str(tables[name])
    if location.startswith("file:"):
        location = unquote(urlparse(location).path)
    elif _SCHEME.match(location):
        return location  # object storage: deltalake (and Spark) read the URL directly
    return str((config.parent / Path(location).expanduser()).resolve())


def _catalog_tables(config: Path) -> dict:
    try:
        loaded = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as exc:
        loaded = exc
    tables = (loaded.get("tables") or {}) if isinstance(loaded, dict) else None
    if not isinstance(tables, dict):
        raise TesseraError(f"{config}: not a catalog config; expected 'tables: {{catalog.schema.table: location, ...}}'")
    return tables


def _resolve_table(path: str, task_type: TaskType, version: int | None, text_column: str) -> Source:
    import pyarrow as pa
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    match = _TABLE.match(path)
    name = match["name"]
    if match["version"] is not None:
        if version is not None and version != int(match["version"]):
            raise TesseraError(f"{path}: names version {match['version']} but version={version} was given")
        version = int(match["version"])
    location = table_location(name)
    try:
        if not DeltaTable.is_deltatable(location):
            raise TesseraError(f"{path}: not a local file or folder, and no Delta table {name} at {location}")
        table = DeltaTable(location)
        latest = table.version()
        if version is None:
            version = latest
        elif not 0 <= version <= latest:
            raise TesseraError(f"{name}: no version {version} (the latest is {latest})")
        else:
            table.load_as_version(version)
    except (DeltaError, OSError) as exc:
        raise TesseraError(f"{name}{'' if version is None else f'@v{version}'}: cannot be read: {exc}") from None
    fields = _columns(pa.schema(table.schema().to_arrow()), task_type, f"{name}@v{version}", text_column)
    return Source(path=path, kind="delta", location=location, version=version, fields=fields)


def _delta_rows(source: Source) -> Iterator[dict]:
    """The pinned version's rows, by DataFusion: only the snapshot's files, deletion vectors applied."""
    import pyarrow as pa
    from deltalake import DeltaTable, QueryBuilder

    columns = ", ".join('"' + c.replace('"', '""') + '"' for c in dict.fromkeys(source.fields.values()))
    with _reading(source, "in-process"):
        table = DeltaTable(source.location, version=source.version)
        reader = QueryBuilder(_SCAN_CONFIG).register("t", table).execute(f"SELECT {columns} FROM t")
        yield from _batches_to_rows(pa.RecordBatchReader.from_stream(reader))


@contextmanager
def _reading(source: Source, engine: str):
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


# --- Hugging Face datasets -----------------------------------------------------------------------


def datasets_root() -> Path:
    return Path(os.environ.get("TESSERA_DATASETS_ROOT", tessera_home() / "datasets")).expanduser().resolve()


def _resolve_dataset(path: str, task_type: TaskType, text_column: str) -> Source:
    dataset, location = _open_split(path)
    fields = _columns(dataset.data.schema, task_type, path, text_column)
    return Source(
        path=path, kind="hf_dataset", location=location, version=dataset._fingerprint,
        split=_DATASET.match(path)["split"], fields=fields,
    )


def _open_split(path: str):
    """(the split as a memory-mapped Dataset, where it lives): a local dataset directory, else the datasets cache."""
    import datasets

    match = _DATASET.match(path)
    name, split = match["name"], match["split"]
    local = datasets_root() / name
    if local.is_dir():
        splits = _saved_splits(local)
        if split not in splits:
            raise TesseraError(f"{path}: no split '{split}' in {local} (splits: {', '.join(splits) or 'none'})")
        return datasets.load_from_disk(str(local / split)), str(local / split)
    try:
        builder = datasets.load_dataset_builder(name)
    except (ConnectionError, FileNotFoundError) as exc:  # offline and not cached, or not on the Hub
        raise TesseraError(
            f"{path}: not a local file or folder, and no dataset '{name}' in {local} or in the datasets cache ({exc})"
        ) from None
    splits = list(builder.info.splits or {})
    if split not in splits:
        raise TesseraError(f"{path}: dataset '{name}' has no split '{split}' (splits: {', '.join(splits) or 'none'})")
    builder.download_and_prepare()  # a no-op when the split is cached
    return builder.as_dataset(split=split), builder.cache_dir


def _saved_splits(directory: Path) -> list[str]:
    """Splits of a saved DatasetDict (its index, or its per-split `Dataset.save_to_disk` directories)."""
    index = directory / "dataset_dict.json"
    if index.is_file():
        return json.loads(index.read_text())["splits"]
    return sorted(p.name for p in directory.iterdir() if (p / "state.json").is_file())


def _dataset_rows(source: Source) -> Iterator[dict]:
    columns = list(dict.fromkeys(source.fields.values()))
    with _reading(source, "in-process"):
        dataset, _ = _open_split(source.path)
        for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=_BATCH_ROWS):
            yield from _batches_to_rows(table.to_batches())


# --- Spark ---------------------------------------------------------------------------------------


@contextmanager
def spark_input(source: Source, cluster: str):
    """The source's input units as a Spark DataFrame, for executors to decode with spark_partition_records:
    a JSONL file's lines (`value`, bytes), a folder's documents (`path`, relative to the folder: listed here,
    as in-process, and read by the executors), or a table's columns at the pinned version. Engine failures
    while the block runs become one message naming the source."""
    with _spark(cluster) as spark, _reading(source, f"Spark at {cluster}"):
        try:
            if source.kind == "jsonl":
                yield spark.read.text(source.location).selectExpr("CAST(value AS BINARY) AS value")
            elif source.kind == "text_folder":  # not Spark's file reader: it drops `_thread.txt`, even named
                files, _ = _text_files(Path(source.location), source.path)
                paths = spark.createDataFrame([(rel,) for rel, _ in files], "path string")
                yield paths.repartition(len(files) // _DOCUMENTS_PER_PARTITION + 1)  # Spark Connect sends a list as one
            else:
                table = spark.read.format("delta").option("versionAsOf", source.version).load(source.location)
                yield table.select(*dict.fromkeys(source.fields.values()))
        except Exception as exc:  # classic Spark fails at load(), Spark Connect when the rows are asked for
            if "DATA_SOURCE_NOT_FOUND" in str(exc):
                raise TesseraError(
                    f"{source.display}: the Spark at {cluster} has no Delta Lake reader (the delta-spark jars are not "
                    "on its classpath, and Tessera does not download them); start Spark with them, use a Spark Connect "
                    "server that reads Delta, or leave data_prep_cluster_id unset to read the table in-process"
                ) from None
            raise


def spark_partition_records(source: Source, batches: Iterable[pa.RecordBatch]) -> Iterator[Record | BadRecord]:
    """On a Spark executor: one partition of spark_input, decoded as read_records decodes in-process. A numbered
    record's `where` is only its position in the partition: partitions come in no fixed order, so an executor
    counts errors and the driver names them (tessera.core.records.named_errors). Documents are named by their file
    (links out of a volume were refused when the source was resolved)."""
    rows = _batches_to_rows(batches)
    if source.kind == "jsonl":
        units = (row["value"] for row in rows)
    elif source.kind == "text_folder":
        folder = Path(source.location)
        units = ((document_name(source.path, row["path"]), (folder / row["path"]).read_bytes()) for row in rows)
    else:
        units = rows
    return decode_units(source, units, lambda k: k)


def _probe(cluster: str) -> None:
    """Fail fast when nothing listens at a Spark Connect URL; the client itself retries for ten minutes."""
    url = urlparse("grpc" + cluster.split(";")[0].removeprefix("sc"))
    try:
        socket.create_connection((url.hostname, url.port or 15002), timeout=10).close()
    except OSError as exc:
        raise TesseraError(f"data_prep_cluster_id {cluster}: no Spark Connect server answers there ({exc})") from None


@contextmanager
def _spark(cluster: str):
    """A Spark session for `cluster`.

    A Spark Connect session is opened for this read and closed after it (cheap; the server stays up),
    through the Connect builder itself, which leaves this process free to start classic Spark later.
    A classic session starts a JVM, so it is reused: the one already running in this process (it must
    be for the same master) or a new one, left running for later reads.
    """
    remote = cluster.startswith("sc://")
    try:
        if remote:
            from pyspark.sql.connect.session import SparkSession as ConnectSession

            _probe(cluster)
            session = ConnectSession.builder.remote(cluster).create()
        else:
            from pyspark.sql import SparkSession

            builder = SparkSession.builder.master(cluster).appName("tessera-data-prep").config("spark.ui.showConsoleProgress", "false")
            if cluster.startswith("local"):  # one JVM here: loopback only, no web UI; workers run this interpreter
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                builder = builder.config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1")
                builder = builder.config("spark.ui.enabled", "false")
            session = builder.getOrCreate()
    except TesseraError:
        raise
    except Exception as exc:
        raise TesseraError(f"data_prep_cluster_id {cluster}: cannot start a Spark session: {exc}") from exc
    if not remote and session.sparkContext.master != cluster:
        raise TesseraError(
            f"data_prep_cluster_id {cluster}: this process already runs Spark at {session.sparkContext.master}; "
            "one process can hold one classic Spark session"
        )
    try:
        yield session
    finally:
        if remote:
            session.stop()


def check_inputs(config: RunConfig) -> RunConfig:
    """Everything about a run's inputs that needs no pass over the data: the model and context length, and each
    data path (it exists, suits the task, has the right columns). Returns the run with each table pinned to
    the version read now (`main.sales.chats` -> `main.sales.chats@v3`), so every stage, and any re-run, sees
    the same data. The records themselves are checked as data prep streams them."""
    resolve_model(config.model, config.context_length)
    pinned = {}
    for field in ("train_data_path", "eval_data_path"):
        path = getattr(config, field)
        if path:
            pinned[field] = resolve_source(path, config.task_type, cluster=config.data_prep_cluster_id).display
    return config.model_copy(update=pinned)
