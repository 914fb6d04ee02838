"""Stage: watch data sources for changes, and say so with a Prefect event that can start a retrain.

A watched source is a data path as a run's `train_data_path` takes it (tessera.core.sources classifies and
resolves it): a Delta table (`catalog.schema.table`, or a folder, local or in a volume, holding a
`_delta_log`), or a file or folder, local or in a volume (`dbfs:/Volumes/...`). Each check compares a
source with what the last check saw, kept in `$TESSERA_HOME/watch/state.json` (written atomically, under a
lock, so overlapping checks do not lose each other's updates):

- a Delta table's *content version* is the version of its latest commit that changed its rows (a write or
  append, a delete, update or merge that touched rows, a restore); OPTIMIZE, VACUUM, property, schema and
  constraint commits leave it alone. A check stats the next commit file (`_delta_log/<version+1>.json`) and
  reads the new commits' history only when one exists.
- a file or folder's content is its set of files (hidden ones, with a leading `.`, skipped; links to folders
  not followed), each with its size and sha256 (a file whose size and mtime are unchanged is not hashed
  again). Each change of that content takes the next number of the source's observation sequence (the
  first sight is 1).

A changed source gets one `tessera.data.updated` event once it has been quiet (unchanged) for `quiet_seconds`:
its id is derived from the source and its content version, so a repeated check, or a check re-run after a
crash, sends the same id again, which Prefect's triggers take once. A change whose event could not be sent (no
events API) stays pending: the next check sends it. The first sight of a source is only
recorded (`watch()` records it when the source is registered), never announced.

Sources to check come from the registry in `$TESSERA_HOME/watch/sources.json` (watch / unwatch / watched)
and from the paths a check is given. Nothing here needs Prefect but the default emitter.

`stage` holds what the watch flow calls (check_sources); beside it: `watchlist` (the registry: watch, unwatch,
watched, the user's API, importable from here), `targets` (where a source is and what it is), `observation` (what a
check records of a source), `delta` (Delta tables), `files` (files and folders), `store` (the durable state).
"""

from tasks.watch.watchlist import unwatch, watch, watched

__all__ = ["unwatch", "watch", "watched"]
