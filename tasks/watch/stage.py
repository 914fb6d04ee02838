"""Stage: check the watched sources. `check_sources` (what the watch flow calls) compares each source with what the
last check saw and emits one `tessera.data.updated` event per source that changed and has then been quiet: its id
derived from the source and its content version, so a repeated check sends the same id again."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Literal

from prefect import task
from pydantic import BaseModel

from tasks import stage_logger
from tasks.watch.observation import content_of, first_sight, observe
from tasks.watch.store import load_json, save_json, state_path, watch_lock
from tasks.watch.targets import Target, resolve_target
from tasks.watch.watchlist import watched
from tessera.core.errors import TesseraError

EVENT = "tessera.data.updated"
DEFAULT_QUIET_SECONDS = 60.0
_EVENT_NAMESPACE = uuid.UUID("6c1f6a4e-3b0e-5f55-9d0c-7e55e3a1a0d1")  # fixed: event ids must never change


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


Emitter = Callable[..., Any]


def prefect_emitter(**event: Any) -> Any:
    """The default emitter: prefect.events.emit_event. It returns the Event, or None when there is no events API to
    send it to; any emitter returns None for an event it did not send."""
    from prefect.events import emit_event

    return emit_event(**event)


@task(name="check-sources")
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
    with watch_lock():
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
        state = load_json(state_path(), {"sources": {}})
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
            save_json(state_path(), state)  # what was emitted is recorded even if a later emit fails
    if failures:
        raise TesseraError(f"{len(failures)} watched source(s) could not be checked:\n" + "\n".join(failures))
    return changes


def _check_one(target: Target, states: dict, quiet: float, now: Callable[[], float]) -> DataChange | None:
    """Observe a source and update what was seen of it; the change due to be announced, if any (not yet sent)."""
    t = now()
    st = states.get(target.id)
    if st is None or st.get("kind") != target.kind:  # first sight (or a folder became a table): record only
        states[target.id] = first_sight(target, t)
        return None
    observed = observe(target, st["observed"])
    if content_of(target.kind, observed) != content_of(target.kind, st["observed"]):
        if target.kind == "volume":
            observed["version"] = st["observed"]["version"] + 1
        st["changed_at"] = t
    elif target.kind == "volume":
        observed["version"] = st["observed"]["version"]
    st["observed"] = observed
    st["checked_at"] = t
    announced = st["announced"]
    if content_of(target.kind, observed) == content_of(target.kind, announced):
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


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)
