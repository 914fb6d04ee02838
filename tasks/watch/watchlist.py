"""The registry of watched sources (`$TESSERA_HOME/watch/sources.json`): watch, unwatch, watched."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel

from tasks.watch.observation import first_sight
from tasks.watch.store import load_json, registry_path, save_json, state_path, watch_lock
from tasks.watch.targets import resolve_target
from tessera.core.errors import TesseraError


class WatchedSource(BaseModel):
    """A registered source (`$TESSERA_HOME/watch/sources.json`)."""

    path: str
    id: str
    kind: Literal["delta", "volume"]
    location: str
    quiet_seconds: float | None = None  # None: the check's own setting
    added_at: datetime


def watch(source_path: str, *, quiet_seconds: float | None = None) -> WatchedSource:
    """Register a source to be checked by every `check_sources` (and the `watch_sources` flow), and record
    what it holds now: later checks announce changes from this point on. Watching a source again updates
    its quiet period and keeps what was seen."""
    target = resolve_target(source_path)
    if quiet_seconds is not None and quiet_seconds < 0:
        raise TesseraError(f"quiet_seconds must be >= 0, not {quiet_seconds}")
    with watch_lock():
        state = load_json(state_path(), {"sources": {}})
        if target.id not in state["sources"]:
            state["sources"][target.id] = first_sight(target, time.time())
            save_json(state_path(), state)
        registry = load_json(registry_path(), {"sources": []})
        at = next((k for k, e in enumerate(registry["sources"]) if e["id"] == target.id), None)
        entry = WatchedSource(
            path=target.path, id=target.id, kind=target.kind, location=target.location, quiet_seconds=quiet_seconds,
            added_at=registry["sources"][at]["added_at"] if at is not None else datetime.now(timezone.utc),
        )
        if at is None:
            registry["sources"].append(entry.model_dump(mode="json"))
        else:
            registry["sources"][at] = entry.model_dump(mode="json")
        save_json(registry_path(), registry)
    return entry


def unwatch(source_path: str) -> bool:
    """Stop watching a source and forget what was seen of it; False if it was not watched."""
    target = resolve_target(source_path)
    with watch_lock():
        registry = load_json(registry_path(), {"sources": []})
        kept = [e for e in registry["sources"] if e["id"] != target.id]
        if len(kept) == len(registry["sources"]):
            return False
        registry["sources"] = kept
        save_json(registry_path(), registry)
        state = load_json(state_path(), {"sources": {}})
        if state["sources"].pop(target.id, None) is not None:
            save_json(state_path(), state)
    return True


def watched() -> list[WatchedSource]:
    """The registered sources, in the order they were first watched."""
    return [WatchedSource.model_validate(e) for e in load_json(registry_path(), {"sources": []})["sources"]]
