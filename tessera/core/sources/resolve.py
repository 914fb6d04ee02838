"""Where a data path enters: classified, checked and resolved to a Source by its kind's module, its records read
in-process, and a run's inputs checked up front. Above every kind's module: this is the one place that picks
among them.

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

What each task accepts: CHAT_COMPLETION and INSTRUCTION_FINETUNE take a `.jsonl` file, a
Delta table or a dataset split; CONTINUED_PRETRAIN takes a folder searched recursively for `.txt`
files (one document each, whatever its name: `_thread.txt` is one; only hidden files and folders, with a
leading `.`, and files that are not `.txt` are skipped, each counted by reason for the data report; links
to folders are not followed), a Delta table or a dataset split with a text column
(`text` unless `text_column` says otherwise). Every refusal that can be made up front (missing,
empty, wrong kind of input, wrong columns, outside its volume) happens in resolve_source.

Without a cluster everything is read in-process (pyarrow, deltalake, datasets), in bounded batches
(read_records); with one, Spark reads files and tables (tessera.core.sources.spark).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Literal

from tessera.core.config import TaskType
from tessera.core.errors import TesseraError
from tessera.core.paths import is_volume_path
from tessera.core.sources.delta import delta_rows, resolve_table
from tessera.core.sources.files import document_name, text_files
from tessera.core.sources.hf_datasets import dataset_rows, resolve_dataset
from tessera.core.sources.local import jsonl_records, resolve_local
from tessera.core.sources.source import DATASET_SPLIT, TABLE_NAME, URL_SCHEME, BadRecord, Record, Source, decode_units
from tessera.core.sources.spark import check_cluster


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
        return resolve_table(path, task_type, version, text_column)
    if kind == "hf_dataset":
        return resolve_dataset(path, task_type, text_column)
    return resolve_local(path, task_type)


def classify(path: str) -> Literal["local", "delta", "hf_dataset"]:
    """Which kind of input a data path names; the rules, in order, are in the module docstring."""
    if is_volume_path(path):
        return "local"
    if URL_SCHEME.match(path):
        raise TesseraError(
            f"{path}: unsupported location; use a volume path (/Volumes/<catalog>/<schema>/<volume>/...), "
            "a local path, a Delta table (catalog.schema.table) or a dataset split (org/name/split)"
        )
    if path.startswith(("/", "~", "./", "../")) or Path(path).exists():
        return "local"
    if TABLE_NAME.match(path):
        return "delta"
    if DATASET_SPLIT.match(path):
        return "hf_dataset"
    return "local"


def read_records(source: Source) -> Iterator[Record | BadRecord]:
    """Stream a source's records in-process; nothing is loaded whole. (With a cluster, Spark executors
    decode their own partitions with the same decoder: see spark_partition_records.)

    Every record that cannot even be decoded (not UTF-8, not JSON, not an object) is a BadRecord;
    the task's rules are tessera.core.records' job.
    """
    name = partial(position_name, source)
    if source.kind == "jsonl":
        return jsonl_records(source, name)
    if source.kind == "text_folder":
        files, _ = text_files(Path(source.location), source.path)
        return decode_units(source, ((document_name(source.path, rel), file.read_bytes()) for rel, file in files), name)
    if source.kind == "delta":
        return decode_units(source, delta_rows(source), name)
    return decode_units(source, dataset_rows(source), name)


def position_name(source: Source, position: int) -> str:
    """How messages name the record at a 0-based position: `path:line` in a file (blank lines count, so
    line numbers match an editor's), `table@v3 row 17` in a table or dataset."""
    return f"{source.path}:{position + 1}" if source.kind == "jsonl" else f"{source.display} row {position}"
