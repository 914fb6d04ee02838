"""Delta tables. `catalog.schema.table` is found at the location the catalog config maps it to (a YAML
file, `$TESSERA_CATALOG_CONFIG` or `$TESSERA_HOME/catalog.yaml`: `tables: {main.sales.chats:
s3://bucket/chats}`; relative paths are relative to that file), else at
`<warehouse>/<catalog>/<schema>/<table>` (`$TESSERA_WAREHOUSE_ROOT`, default `$TESSERA_HOME/warehouse`).
The version read is pinned when the source is resolved: the one the user names (`main.sales.chats@v3`
or `version=3`), else the latest; Source.version records it, so lineage and the prepared-data cache
name exactly the data trained on. A bad row is reported as `main.sales.chats@v3 row 17`: rows count
from 0 in the order the engine reads the pinned version (stable for that version and engine).

deltalake and pyarrow are imported where a table is opened, not with this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from tessera.core.config import TaskType
from tessera.core.errors import TesseraError
from tessera.core.paths import tessera_home
from tessera.core.sources.columns import BATCH_ROWS, batches_to_rows, record_fields
from tessera.core.sources.source import TABLE_NAME, URL_SCHEME, Source, reading

_SCAN_CONFIG = {
    "datafusion.execution.batch_size": str(BATCH_ROWS),
    "datafusion.execution.target_partitions": "1",  # one stream, files in order: row numbers are stable
}


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
    elif URL_SCHEME.match(location):
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


def resolve_table(path: str, task_type: TaskType, version: int | None, text_column: str) -> Source:
    import pyarrow as pa
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    match = TABLE_NAME.match(path)
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
    fields = record_fields(pa.schema(table.schema().to_arrow()), task_type, f"{name}@v{version}", text_column)
    return Source(path=path, kind="delta", location=location, version=version, fields=fields)


def delta_rows(source: Source) -> Iterator[dict]:
    """The pinned version's rows, by DataFusion: only the snapshot's files, deletion vectors applied."""
    import pyarrow as pa
    from deltalake import DeltaTable, QueryBuilder

    columns = ", ".join('"' + c.replace('"', '""') + '"' for c in dict.fromkeys(source.fields.values()))
    with reading(source, "in-process"):
        table = DeltaTable(source.location, version=source.version)
        reader = QueryBuilder(_SCAN_CONFIG).register("t", table).execute(f"SELECT {columns} FROM t")
        yield from batches_to_rows(pa.RecordBatchReader.from_stream(reader))
