"""Hugging Face datasets. `org/name/split` is read from a local dataset directory first,
`<datasets root>/org/name/<split>` as `DatasetDict.save_to_disk` (or `Dataset.save_to_disk` per split)
writes it (`$TESSERA_DATASETS_ROOT`, default `$TESSERA_HOME/datasets`), else through the `datasets`
library's cache (as `load_dataset` finds it; offline when HF_DATASETS_OFFLINE=1). A bad row is
`org/name/split row 17`, the index `dataset[17]` finds. Source.version holds the dataset's fingerprint.

Dataset splits are always read in-process (Spark has no reader for them); `datasets` is imported where a
split is opened, not with this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from tessera.core.config import TaskType
from tessera.core.errors import TesseraError
from tessera.core.paths import tessera_home
from tessera.core.sources.columns import BATCH_ROWS, batches_to_rows, record_fields
from tessera.core.sources.source import DATASET_SPLIT, Source, reading


def datasets_root() -> Path:
    return Path(os.environ.get("TESSERA_DATASETS_ROOT", tessera_home() / "datasets")).expanduser().resolve()


def resolve_dataset(path: str, task_type: TaskType, text_column: str) -> Source:
    dataset, location = _open_split(path)
    fields = record_fields(dataset.data.schema, task_type, path, text_column)
    return Source(
        path=path, kind="hf_dataset", location=location, version=dataset._fingerprint,
        split=DATASET_SPLIT.match(path)["split"], fields=fields,
    )


def _open_split(path: str):
    """(the split as a memory-mapped Dataset, where it lives): a local dataset directory, else the datasets cache."""
    import datasets

    match = DATASET_SPLIT.match(path)
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


def dataset_rows(source: Source) -> Iterator[dict]:
    columns = list(dict.fromkeys(source.fields.values()))
    with reading(source, "in-process"):
        dataset, _ = _open_split(source.path)
        for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=BATCH_ROWS):
            yield from batches_to_rows(table.to_batches())
