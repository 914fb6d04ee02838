"""Delta tables: a table's content version, the version of its latest commit that changed rows. Maintenance,
metadata, schema and constraint commits leave it alone; a check costs one stat when nothing was committed since."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tasks.watch.targets import Target
from tessera.core.errors import TesseraError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Delta operations that never change a table's rows (maintenance, metadata, schema, constraints)
_NO_CONTENT_OPERATIONS = {
    "OPTIMIZE", "VACUUM START", "VACUUM END", "REORG", "FSCK", "SET TBLPROPERTIES", "UNSET TBLPROPERTIES",
    "UPGRADE PROTOCOL", "ADD CONSTRAINT", "DROP CONSTRAINT", "ADD COLUMNS", "CHANGE COLUMN", "CHANGE COLUMNS",
    "REPLACE COLUMNS", "UPDATE SCHEMA", "ADD FEATURE", "DROP FEATURE", "UPDATE FIELD METADATA",
    "SET COLUMN METADATA", "COMPUTE STATS", "ADD DELETION VECTORS TOMBSTONES", "CLUSTER BY", "ANALYZE",
}
# their row counts, by delta-rs's and Spark's names
_ROW_METRICS = {
    "DELETE": ("num_deleted_rows", "numDeletedRows"),
    "UPDATE": ("num_updated_rows", "numUpdatedRows"),
    "MERGE": (
        "num_target_rows_inserted", "num_target_rows_updated", "num_target_rows_deleted",
        "numTargetRowsInserted", "numTargetRowsUpdated", "numTargetRowsDeleted",
    ),
}
_WRITE_METRICS = (  # any other operation changes the content when it added or removed rows or files
    "num_added_rows", "num_added_files", "num_removed_files", "numOutputRows", "numFiles", "numAddedFiles",
    "numRemovedFiles", "numRemovedBytes", "num_removed_rows", "numDeletedRows", "num_deleted_rows",
)


def observe_delta(target: Target, previous: dict | None) -> dict:
    """{"version": content version, "log_version": latest commit seen}. With a previous observation, a table
    on a local path costs one stat when nothing was committed since."""
    location = target.location
    if previous is not None and not _URL.match(location):
        log = Path(location) / "_delta_log"
        if not (log / f"{previous['log_version'] + 1:020d}.json").exists():
            if not log.is_dir():
                raise TesseraError(f"{target.path}: no Delta table at {location} any more")
            return dict(previous)
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    try:
        if not DeltaTable.is_deltatable(location):
            raise TesseraError(f"{target.path}: no Delta table at {location}")
        table = DeltaTable(location)
        latest = table.version()
        if previous is not None and latest == previous["log_version"]:
            return dict(previous)
        if previous is None or latest < previous["log_version"]:  # first sight, or the table was re-created
            return {"version": _latest_content_version(table, latest), "log_version": latest}
        commits = table.history(latest - previous["log_version"])
    except (DeltaError, OSError) as exc:
        raise TesseraError(f"{target.path}: cannot read the Delta table at {location}: {exc}") from None
    content = [c["version"] for c in commits if c["version"] > previous["log_version"] and changes_content(c)]
    return {"version": max(content, default=previous["version"]), "log_version": latest}


def _latest_content_version(table, latest: int) -> int:
    """The version of the newest commit that changed rows; a recent page of history first, then all of it.
    A table with no such commit (created empty, then only altered) is at its first version."""
    for limit in (50, None):
        commits = table.history(limit)
        for commit in commits:  # newest first
            if changes_content(commit):
                return commit["version"]
        if limit is None or len(commits) < limit:
            break
    return min((c["version"] for c in commits), default=latest)


def changes_content(commit: dict) -> bool:
    """Whether a Delta commit (its commitInfo, as DeltaTable.history gives it) changed the table's rows."""
    operation = str(commit.get("operation", "")).upper()
    metrics = commit.get("operationMetrics") or {}
    if operation in _NO_CONTENT_OPERATIONS:
        return False
    if operation in _ROW_METRICS:
        known = [metrics[k] for k in _ROW_METRICS[operation] if k in metrics]
        return not known or any(_positive(v) for v in known)  # no metrics: assume it did
    known = [metrics[k] for k in _WRITE_METRICS if k in metrics]
    if known:
        return any(_positive(v) for v in known)
    return operation not in ("CREATE TABLE", "")  # a write without metrics: assume it did; an empty create did not


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False
