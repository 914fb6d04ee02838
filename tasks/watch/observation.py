"""What a check records of a source: an observation (a Delta table's content version, or a file set and its hash)
and, at first sight, the source's whole entry in the state, recorded as announced."""

from __future__ import annotations

from typing import Any

from tasks.watch.delta import observe_delta
from tasks.watch.files import observe_files
from tasks.watch.targets import Target


def observe(target: Target, previous: dict | None) -> dict:
    if target.kind == "delta":
        return observe_delta(target, previous)
    return observe_files(target, previous)


def content_of(kind: str, observation: dict) -> Any:
    """What decides whether the content changed: a table's content version, a file set's hash."""
    return observation["version"] if kind == "delta" else observation["hash"]


def first_sight(target: Target, t: float) -> dict:
    """A source's entry in the state when a check first sees it: what it holds now, recorded as announced (a
    first sight is never announced)."""
    observed = observe(target, None)
    if target.kind == "volume":
        observed["version"] = 1
    return {
        "path": target.path, "kind": target.kind, "location": target.location, "observed": observed,
        "announced": {"version": observed["version"], "hash": observed.get("hash"), "event_id": None, "at": t},
        "changed_at": t, "checked_at": t, "pending_since": None,
    }
