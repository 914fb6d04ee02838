"""The data-change watcher: run every few minutes, it emits one `tessera.data.updated` event per watched source
whose content changed (and has been quiet since), for an event trigger to start a retrain. Wiring only; the
logic is in tasks/watch/."""

from __future__ import annotations

from prefect import flow

from tasks import stage_logger
from tasks.watch.stage import DEFAULT_QUIET_SECONDS, DataChange, check_sources


@flow(name="watch-sources")
def watch_sources(paths: list[str] | None = None, quiet_seconds: float = DEFAULT_QUIET_SECONDS) -> list[DataChange]:
    """Check the watched data sources for changes; emit a `tessera.data.updated` event for each changed one.

    Args:
        paths: Data paths to check besides the registered ones (`tasks.watch.watch`): a Delta table
            (catalog.schema.table), or a file or folder (dbfs:/Volumes/... or local). The first check of a
            path only records what it holds.
        quiet_seconds: A change is announced once its source has stayed unchanged this long (a registered
            source's own setting wins).
    """
    changes = check_sources(paths, quiet_seconds=quiet_seconds)
    stage_logger().info("%d source(s) changed", len(changes))
    return changes
