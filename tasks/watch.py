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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from tasks import stage_logger
from tessera.core import sources
from tessera.core.errors import TesseraError
from tessera.core.paths import file_lock, is_volume_path, resolve_data_path, tessera_home, write_atomic

EVENT = "tessera.data.updated"
RESOURCE_PREFIX = "tessera.dataset."
DEFAULT_QUIET_SECONDS = 60.0
_EVENT_NAMESPACE = uuid.UUID("6c1f6a4e-3b0e-5f55-9d0c-7e55e3a1a0d1")  # fixed: event ids must never change
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HASH_CHUNK = 1 << 20

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


class DataChange(BaseModel):
    """One source announced as changed: what its `tessera.data.updated` event says."""

    source: str  # the data path as registered or given
    kind: Literal["delta", "volume"]
    resource_id: str  # tessera.dataset.<stable id>
    location: str  # the table location, or the local file or folder
    version: int  # the Delta content version, or the file set's observation sequence number
    previous_version: int | None  # the version announced (or first seen) before this one
    content_hash: str | None  # a file or folder's sha256 over its files; None for a table
    data_path: str  # a train_data_path that reads exactly this version where one exists (`c.s.t@v7`)
    event_id: uuid.UUID
    first_seen_at: datetime  # when a check first saw the change pending
    emitted_at: datetime

    def payload(self) -> dict[str, Any]:
        return {
            "source": self.source, "kind": self.kind, "version": self.version, "content_hash": self.content_hash,
            "previous_version": self.previous_version, "data_path": self.data_path, "location": self.location,
            "first_seen_at": self.first_seen_at.isoformat(),
        }

    def resource(self) -> dict[str, str]:
        return {"prefect.resource.id": self.resource_id, "prefect.resource.name": self.source, "tessera.source": self.source}


class WatchedSource(BaseModel):
    """A registered source (`$TESSERA_HOME/watch/sources.json`)."""

    path: str
    id: str
    kind: Literal["delta", "volume"]
    location: str
    quiet_seconds: float | None = None  # None: the check's own setting
    added_at: datetime


@dataclass(frozen=True)
class Target:
    """A data path resolved for watching."""

    path: str
    id: str  # stable: the same source however it is written (`/Volumes/...` or `dbfs:/Volumes/...`)
    kind: Literal["delta", "volume"]
    location: str
    table: str | None = None  # catalog.schema.table when the path names a table

    @property
    def resource_id(self) -> str:
        return RESOURCE_PREFIX + self.id

    def data_path(self, version: int) -> str:
        return f"{self.table}@v{version}" if self.table else self.path


# --- where sources are and what they are ---------------------------------------------------------


def watch_dir() -> Path:
    return tessera_home() / "watch"


def resolve_target(path: str) -> Target:
    """Classify a data path as tessera.core.sources does, and say what to watch: a Delta table or a file set.
    Refuses what cannot be watched (a pinned table version, a dataset split, object storage URLs)."""
    path = path.strip()
    kind = sources.classify(path)  # refuses unsupported schemes
    if kind == "hf_dataset":
        raise TesseraError(f"{path}: a dataset split cannot be watched; watch a Delta table or a file or folder")
    if kind == "delta":
        if "@" in path:
            raise TesseraError(f"{path}: a pinned table version never changes; watch {path.split('@')[0]}")
        return Target(path, _stable_id(f"table:{path}", path), "delta", sources.table_location(path), table=path)
    local = resolve_data_path(path)  # refuses volume paths that leave their volume
    if is_volume_path(path):
        parts = [p for p in path.removeprefix("dbfs:").split("/") if p not in ("", ".")]
        canonical = "/" + "/".join(parts)
    else:
        canonical = str(local)
    kind = "delta" if (local / "_delta_log").is_dir() else "volume"
    return Target(path, _stable_id(f"{kind}:{canonical}", canonical), kind, str(local))


def _stable_id(canonical: str, readable: str) -> str:
    """`<readable slug>-<12 hex of the canonical form>`: readable in the UI, unique by the hash."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", readable).strip("-.")[-48:].strip("-.") or "source"
    return f"{slug}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


# --- the registry --------------------------------------------------------------------------------


def watch(source_path: str, *, quiet_seconds: float | None = None) -> WatchedSource:
    """Register a source to be checked by every `check_sources` (and the `watch_sources` flow), and record
    what it holds now: later checks announce changes from this point on. Watching a source again updates
    its quiet period and keeps what was seen."""
    target = resolve_target(source_path)
    if quiet_seconds is not None and quiet_seconds < 0:
        raise TesseraError(f"quiet_seconds must be >= 0, not {quiet_seconds}")
    with _locked():
        state = _load(_state_path(), {"sources": {}})
        if target.id not in state["sources"]:
            state["sources"][target.id] = _first_sight(target, time.time())
            _save(_state_path(), state)
        registry = _load(_registry_path(), {"sources": []})
        at = next((k for k, e in enumerate(registry["sources"]) if e["id"] == target.id), None)
        entry = WatchedSource(
            path=target.path, id=target.id, kind=target.kind, location=target.location, quiet_seconds=quiet_seconds,
            added_at=registry["sources"][at]["added_at"] if at is not None else datetime.now(timezone.utc),
        )
        if at is None:
            registry["sources"].append(entry.model_dump(mode="json"))
        else:
            registry["sources"][at] = entry.model_dump(mode="json")
        _save(_registry_path(), registry)
    return entry


def unwatch(source_path: str) -> bool:
    """Stop watching a source and forget what was seen of it; False if it was not watched."""
    target = resolve_target(source_path)
    with _locked():
        registry = _load(_registry_path(), {"sources": []})
        kept = [e for e in registry["sources"] if e["id"] != target.id]
        if len(kept) == len(registry["sources"]):
            return False
        registry["sources"] = kept
        _save(_registry_path(), registry)
        state = _load(_state_path(), {"sources": {}})
        if state["sources"].pop(target.id, None) is not None:
            _save(_state_path(), state)
    return True


def watched() -> list[WatchedSource]:
    """The registered sources, in the order they were first watched."""
    return [WatchedSource.model_validate(e) for e in _load(_registry_path(), {"sources": []})["sources"]]


# --- checking ------------------------------------------------------------------------------------


Emitter = Callable[..., Any]


def prefect_emitter(**event: Any) -> Any:
    """The default emitter: prefect.events.emit_event. It returns the Event, or None when there is no events API to
    send it to; any emitter returns None for an event it did not send."""
    from prefect.events import emit_event

    return emit_event(**event)


def check_sources(
    paths: Iterable[str] | None = None,
    *,
    quiet_seconds: float = DEFAULT_QUIET_SECONDS,
    include_registered: bool = True,
    emit: Emitter | None = None,
    now: Callable[[], float] = time.time,
) -> list[DataChange]:
    """Check the registered sources (unless include_registered=False) and `paths` against what was seen last;
    emit one `tessera.data.updated` event for each source whose content changed and has then been quiet for
    its quiet period (a registered source's own, else `quiet_seconds`). Returns the changes announced.

    `emit(event=, resource=, payload=, id=, occurred=)` sends an event (default: Prefect's emit_event) and returns
    None when it could not (no events API): that change stays pending, and a later check sends it.
    `now()` is the clock, in seconds. A source that cannot be read (gone, not a table any more) is skipped
    and reported: the others are still checked, and then a TesseraError names every failure."""
    if quiet_seconds < 0:
        raise TesseraError(f"quiet_seconds must be >= 0, not {quiet_seconds}")
    emit = prefect_emitter if emit is None else emit
    log = stage_logger()
    changes: list[DataChange] = []
    failures: list[str] = []
    with _locked():
        targets: dict[str, tuple[Target, float]] = {}
        if include_registered:
            wanted = [(e.path, quiet_seconds if e.quiet_seconds is None else e.quiet_seconds) for e in watched()]
        else:
            wanted = []
        for path, quiet in wanted + [(p, quiet_seconds) for p in paths or ()]:
            try:  # resolved afresh: the catalog config may have moved a table
                target = resolve_target(path)
            except TesseraError as exc:
                failures.append(str(exc))
                continue
            targets.setdefault(target.id, (target, quiet))
        state = _load(_state_path(), {"sources": {}})
        try:
            for target, quiet in targets.values():
                try:
                    change = _check_one(target, state["sources"], quiet, now)
                except TesseraError as exc:
                    failures.append(str(exc))
                    continue
                if change is None:
                    continue
                if not _announce(change, state["sources"][target.id], emit):
                    log.warning("%s changed (version %s) but its event was not sent (no Prefect events API: set "
                                "PREFECT_API_URL); the next check sends it", target.path, change.version)
                    continue
                log.info("%s changed: version %s (event %s)", target.path, change.version, change.event_id)
                changes.append(change)
        finally:
            _save(_state_path(), state)  # what was emitted is recorded even if a later emit fails
    if failures:
        raise TesseraError(f"{len(failures)} watched source(s) could not be checked:\n" + "\n".join(failures))
    return changes


def _check_one(target: Target, states: dict, quiet: float, now: Callable[[], float]) -> DataChange | None:
    """Observe a source and update what was seen of it; the change due to be announced, if any (not yet sent)."""
    t = now()
    st = states.get(target.id)
    if st is None or st.get("kind") != target.kind:  # first sight (or a folder became a table): record only
        states[target.id] = _first_sight(target, t)
        return None
    observed = _observe(target, st["observed"])
    if _content(target.kind, observed) != _content(target.kind, st["observed"]):
        if target.kind == "volume":
            observed["version"] = st["observed"]["version"] + 1
        st["changed_at"] = t
    elif target.kind == "volume":
        observed["version"] = st["observed"]["version"]
    st["observed"] = observed
    st["checked_at"] = t
    announced = st["announced"]
    if _content(target.kind, observed) == _content(target.kind, announced):
        st["pending_since"] = None  # nothing new, or changed back to what was announced
        return None
    if st.get("pending_since") is None:
        st["pending_since"] = t
    if t - st["changed_at"] < quiet:
        return None  # still changing, or not quiet for long enough yet
    version, digest = observed["version"], observed.get("hash")
    return DataChange(
        source=target.path, kind=target.kind, resource_id=target.resource_id, location=target.location,
        version=version, previous_version=announced["version"], content_hash=digest,
        data_path=target.data_path(version), event_id=event_id(target, version, digest),
        first_seen_at=_utc(st["pending_since"]), emitted_at=_utc(t),
    )


def _announce(change: DataChange, st: dict, emit: Emitter) -> bool:
    """Send the change's event and record it announced; False when the emitter sent nothing (it returned None), so
    the change stays pending and the next check sends it rather than it being lost."""
    sent = emit(event=EVENT, resource=change.resource(), payload=change.payload(), id=change.event_id,
                occurred=change.emitted_at)
    if sent is None:
        return False
    st["announced"] = {"version": change.version, "hash": change.content_hash, "event_id": str(change.event_id),
                       "at": st["checked_at"]}
    st["pending_since"] = None
    return True


def event_id(target: Target, version: int, content_hash: str | None = None) -> uuid.UUID:
    """The same for the same source and content version (and file set hash), whichever check sends it."""
    return uuid.uuid5(_EVENT_NAMESPACE, f"{EVENT}/{target.resource_id}/{version}/{content_hash or ''}")


def _first_sight(target: Target, t: float) -> dict:
    observed = _observe(target, None)
    if target.kind == "volume":
        observed["version"] = 1
    return {
        "path": target.path, "kind": target.kind, "location": target.location, "observed": observed,
        "announced": {"version": observed["version"], "hash": observed.get("hash"), "event_id": None, "at": t},
        "changed_at": t, "checked_at": t, "pending_since": None,
    }


def _content(kind: str, observation: dict) -> Any:
    return observation["version"] if kind == "delta" else observation["hash"]


def _observe(target: Target, previous: dict | None) -> dict:
    if target.kind == "delta":
        return _observe_delta(target, previous)
    return _observe_files(target, previous)


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


# --- Delta tables --------------------------------------------------------------------------------


def _observe_delta(target: Target, previous: dict | None) -> dict:
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


# --- files and folders ---------------------------------------------------------------------------


def _observe_files(target: Target, previous: dict | None) -> dict:
    """{"files": {relative path: {size, mtime_ns, sha256}}, "hash": sha256 over them}. A file whose size and
    mtime match the previous observation keeps its hash unread."""
    root = Path(target.location)
    if not root.exists():
        raise TesseraError(f"{target.path}: no such file or directory")
    known = (previous or {}).get("files", {})
    files: dict[str, dict] = {}
    for rel, file in _files(root):
        try:
            stat = file.stat()
            seen = known.get(rel)
            if seen and seen["size"] == stat.st_size and seen["mtime_ns"] == stat.st_mtime_ns:
                digest = seen["sha256"]
            else:
                digest = _sha256(file)
        except FileNotFoundError:  # removed while listed
            continue
        files[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['size']}\0{files[rel]['sha256']}\n".encode())
    return {"files": files, "hash": h.hexdigest()}


def _files(root: Path) -> Iterator[tuple[str, Path]]:
    if root.is_file():
        yield root.name, root
        return
    for folder, dirs, names in os.walk(root):  # links to folders are not followed
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            file = Path(folder) / name
            if not name.startswith(".") and file.is_file():
                yield file.relative_to(root).as_posix(), file


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- durable state -------------------------------------------------------------------------------


def _state_path() -> Path:
    return watch_dir() / "state.json"


def _registry_path() -> Path:
    return watch_dir() / "sources.json"


def _locked():
    """One check or registry change at a time (scheduled runs may overlap)."""
    return file_lock(watch_dir() / ".lock")


def _load(path: Path, empty: dict) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return json.loads(json.dumps(empty))
    except json.JSONDecodeError as exc:
        raise TesseraError(f"{path}: not valid JSON ({exc}); fix or remove it") from None
    return data


def _save(path: Path, data: dict) -> None:
    """The state or the registry, in its file format (1)."""
    write_atomic(path, json.dumps({"format": 1, **data}, indent=1, sort_keys=True))
