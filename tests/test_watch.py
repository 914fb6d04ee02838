"""The data-change watcher (tasks/watch/, flows/watch.py): Delta content versions, file sets, debounce, events."""

from __future__ import annotations

import json
import shutil
import time

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from tasks.watch import delta, files
from tasks.watch.stage import check_sources, prefect_emitter
from tasks.watch.watchlist import unwatch, watch, watched
from tessera.core.errors import TesseraError


class Emitted(list):
    """An emitter that keeps what it was given (the keyword arguments of prefect.events.emit_event)."""

    def __call__(self, **event):
        self.append(event)
        return event


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def rows(*texts: str) -> pa.Table:
    return pa.Table.from_pylist([{"text": t} for t in texts])


def table(home, name: str = "main.sales.docs", *texts: str) -> tuple[str, str]:
    """A Delta table in the warehouse (version 0), as its name and location."""
    location = str(home / "warehouse" / name.replace(".", "/"))
    write_deltalake(location, rows(*(texts or ("a", "b"))))
    return name, location


def check(emitted: Emitted, clock: Clock | None = None, quiet: float = 0, **kwargs):
    return check_sources.fn(quiet_seconds=quiet, emit=emitted, now=clock or Clock(), **kwargs)


def test_append_emits_one_event_then_nothing_when_unchanged(home):
    name, location = table(home)
    watch(name)
    emitted = Emitted()
    assert check(emitted) == []  # nothing changed since it was watched
    write_deltalake(location, rows("c"), mode="append")  # version 1

    [change] = check(emitted)

    assert (change.kind, change.version, change.previous_version, change.data_path) == ("delta", 1, 0, f"{name}@v1")
    [event] = emitted
    assert event["event"] == "tessera.data.updated"
    assert event["resource"]["prefect.resource.id"] == change.resource_id
    assert change.resource_id.startswith("tessera.dataset.main.sales.docs-")
    assert event["resource"]["tessera.source"] == name
    assert event["payload"]["source"] == name
    assert (event["payload"]["kind"], event["payload"]["version"], event["payload"]["content_hash"]) == ("delta", 1, None)
    assert event["id"] == change.event_id
    assert check(emitted) == [] and len(emitted) == 1  # unchanged since: no second event


def test_optimize_and_metadata_commits_change_no_content_version(home):
    name, location = table(home)
    for text in ("c", "d", "e"):
        write_deltalake(location, rows(text), mode="append")  # versions 1-3: small files to compact
    watch(name)
    emitted = Emitted()
    dt = DeltaTable(location)
    dt.optimize.compact()
    dt.alter.set_table_properties({"delta.logRetentionDuration": "interval 30 days"})
    dt.alter.add_constraint({"text_not_empty": "text <> ''"})
    dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    latest = DeltaTable(location).version()
    assert latest >= 6
    ops = [c["operation"] for c in DeltaTable(location).history(latest - 3)]
    assert "OPTIMIZE" in ops and "SET TBLPROPERTIES" in ops

    assert check(emitted) == [] and emitted == []
    state = json.loads((home / "watch" / "state.json").read_text())["sources"]
    [entry] = state.values()
    assert entry["observed"] == {"version": 3, "log_version": latest}  # every commit seen; content still at 3

    write_deltalake(location, rows("f"), mode="append")
    [change] = check(emitted)
    assert (change.version, change.previous_version) == (latest + 1, 3)


def test_delete_update_with_rows_change_content_and_without_do_not(home):
    name, location = table(home, "main.sales.docs", "a", "b", "c")
    watch(name)
    emitted = Emitted()
    DeltaTable(location).delete("text = 'nothing like this'")
    DeltaTable(location).update(predicate="text = 'nothing either'", updates={"text": "'x'"})
    assert check(emitted) == []
    DeltaTable(location).delete("text = 'a'")
    [change] = check(emitted)
    assert change.version == DeltaTable(location).version()


def test_changes_content_reads_spark_and_delta_rs_commit_infos():
    assert delta.changes_content({"operation": "WRITE", "operationMetrics": {"numFiles": "1", "numOutputRows": "10"}})
    assert delta.changes_content({"operation": "MERGE", "operationMetrics": {"numTargetRowsInserted": "0", "numTargetRowsUpdated": "2"}})
    assert not delta.changes_content({"operation": "MERGE", "operationMetrics": {"num_target_rows_inserted": 0, "num_target_rows_updated": 0, "num_target_rows_deleted": 0}})
    assert not delta.changes_content({"operation": "OPTIMIZE", "operationMetrics": {"numFilesAdded": 1, "numFilesRemoved": 4}})
    assert not delta.changes_content({"operation": "VACUUM END", "operationMetrics": {"numDeletedFiles": "3"}})
    assert not delta.changes_content({"operation": "SET TBLPROPERTIES"})
    assert delta.changes_content({"operation": "RESTORE", "operationMetrics": {"numRemovedFiles": "2", "numRestoredFiles": "1"}})
    assert delta.changes_content({"operation": "STREAMING UPDATE"})  # no metrics: assume rows changed


def test_one_event_per_changed_source_none_for_unchanged(home):
    changed, changed_location = table(home, "main.sales.changed")
    quiet, _ = table(home, "main.sales.quiet")
    docs = home / "volumes" / "main" / "default" / "docs"
    docs.mkdir(parents=True)
    (docs / "a.txt").write_text("first")
    still = home / "volumes" / "main" / "default" / "still"
    still.mkdir(parents=True)
    (still / "a.txt").write_text("never changes")
    for path in (changed, quiet, "dbfs:/Volumes/main/default/docs", "dbfs:/Volumes/main/default/still"):
        watch(path)
    write_deltalake(changed_location, rows("c"), mode="append")
    (docs / "b.txt").write_text("second")
    emitted = Emitted()

    changes = check(emitted)

    assert sorted(c.source for c in changes) == sorted([changed, "dbfs:/Volumes/main/default/docs"])
    assert sorted(e["resource"]["tessera.source"] for e in emitted) == sorted(c.source for c in changes)
    assert len({e["resource"]["prefect.resource.id"] for e in emitted}) == 2


def test_folder_changes_take_the_next_sequence_number_and_unchanged_files_are_not_rehashed(home, monkeypatch):
    docs = home / "volumes" / "main" / "default" / "docs"
    (docs / "part0").mkdir(parents=True)
    (docs / "part0" / "a.txt").write_text("first document")
    (docs / ".hidden").write_text("editor state: ignored")
    path = "dbfs:/Volumes/main/default/docs"
    watch(path)
    emitted = Emitted()
    hashed = []
    real = files._sha256
    monkeypatch.setattr(files, "_sha256", lambda f: hashed.append(f.name) or real(f))

    (docs / "b.txt").write_text("a new file")
    [added] = check(emitted)
    assert (added.kind, added.version, added.previous_version) == ("volume", 2, 1)
    assert hashed == ["b.txt"]  # a.txt: same size and mtime, hash kept

    (docs / "part0" / "a.txt").write_text("first document, edited")
    [modified] = check(emitted)
    assert (modified.version, modified.previous_version) == (3, 2)
    assert modified.content_hash != added.content_hash and modified.content_hash
    assert emitted[-1]["payload"]["content_hash"] == modified.content_hash
    assert modified.data_path == path

    (docs / ".hidden").write_text("hidden files do not count")
    assert check(emitted) == []
    (docs / "b.txt").unlink()
    [removed] = check(emitted)
    assert removed.version == 4


def test_the_same_source_version_gets_the_same_event_id_on_a_repeated_check(home):
    name, location = table(home)
    watch(name)
    state = home / "watch" / "state.json"
    write_deltalake(location, rows("c"), mode="append")
    before = state.read_text()
    first, second = Emitted(), Emitted()

    [change] = check(first)
    state.write_text(before)  # as if the check had crashed before recording its event
    [again] = check(second)

    assert change.event_id == again.event_id == first[0]["id"] == second[0]["id"]
    write_deltalake(location, rows("d"), mode="append")
    [later] = check(second)
    assert later.event_id != change.event_id


def test_a_change_with_no_events_api_to_send_it_to_stays_pending_for_the_next_check(home):
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

    name, location = table(home)
    watch(name)
    write_deltalake(location, rows("c"), mode="append")
    clock = Clock()
    with temporary_settings({PREFECT_API_URL: None, PREFECT_API_KEY: "a-key"}):  # no server, no ephemeral API
        assert prefect_emitter(event="probe", resource={"prefect.resource.id": "probe"}) is None
        assert check_sources.fn(quiet_seconds=0, emit=prefect_emitter, now=clock) == []  # nothing was sent

    clock.t += 30
    emitted = Emitted()
    [change] = check(emitted, clock)  # the next check sends it
    assert (change.version, change.previous_version) == (1, 0) and [e["id"] for e in emitted] == [change.event_id]
    assert change.first_seen_at.timestamp() == clock.t - 30  # pending since the check that could not send it
    assert check(emitted, clock) == [] and len(emitted) == 1


def test_quiet_period_holds_the_event_until_the_source_stopped_changing(home):
    docs = home / "volumes" / "main" / "default" / "docs"
    docs.mkdir(parents=True)
    (docs / "a.txt").write_text("first")
    path = "/Volumes/main/default/docs"
    watch(path, quiet_seconds=10)
    clock, emitted = Clock(), Emitted()

    (docs / "b.txt").write_text("second")
    assert check(emitted, clock) == []  # just seen: pending
    clock.t += 6
    (docs / "c.txt").write_text("third")  # changed again: the quiet period restarts
    assert check(emitted, clock) == []
    clock.t += 6
    assert check(emitted, clock) == []  # 6 s quiet, 10 needed
    clock.t += 4
    [change] = check(emitted, clock)  # 10 s quiet

    assert change.version == 3  # two changes seen (b.txt, then c.txt), one event
    assert change.first_seen_at.timestamp() == clock.t - 16
    assert len(emitted) == 1
    clock.t += 100
    assert check(emitted, clock) == []


def test_registry_watch_unwatch_and_paths_given_to_a_check(home):
    docs = home / "volumes" / "main" / "default" / "docs"
    docs.mkdir(parents=True)
    (docs / "a.txt").write_text("first")
    name, location = table(home)
    one = watch("dbfs:/Volumes/main/default/docs")
    assert watch("/Volumes/main/default/docs/").id == one.id  # the same volume folder however written
    watch(name, quiet_seconds=5)
    assert [(s.path, s.kind, s.quiet_seconds) for s in watched()] == [
        ("/Volumes/main/default/docs/", "volume", None), (name, "delta", 5),
    ]
    with pytest.raises(TesseraError, match="pinned"):
        watch(f"{name}@v0")
    with pytest.raises(TesseraError, match="dataset split"):
        watch("acme/data/train")
    assert unwatch(name) and not unwatch(name)
    assert [s.kind for s in watched()] == ["volume"]

    other = home / "elsewhere"
    other.mkdir()
    write_deltalake(str(other / "table"), rows("a"))  # a Delta table by its location, not registered
    emitted = Emitted()
    assert check(emitted, paths=[str(other / "table")]) == []  # first sight: recorded only
    write_deltalake(str(other / "table"), rows("b"), mode="append")
    [change] = check(emitted, paths=[str(other / "table")])
    assert (change.kind, change.version, change.data_path) == ("delta", 1, str(other / "table"))


def test_a_missing_source_is_reported_after_the_others_are_checked(home):
    docs = home / "volumes" / "main" / "default" / "docs"
    docs.mkdir(parents=True)
    (docs / "a.txt").write_text("first")
    gone = home / "volumes" / "main" / "default" / "gone"
    gone.mkdir()
    (gone / "a.txt").write_text("soon gone")
    watch("dbfs:/Volumes/main/default/gone")
    watch("dbfs:/Volumes/main/default/docs")
    shutil.rmtree(gone)
    (docs / "b.txt").write_text("second")
    emitted = Emitted()
    with pytest.raises(TesseraError, match="gone: no such file"):
        check(emitted)
    assert [e["resource"]["tessera.source"] for e in emitted] == ["dbfs:/Volumes/main/default/docs"]
    assert unwatch("dbfs:/Volumes/main/default/gone")
    assert check(emitted) == [] and len(emitted) == 1


@pytest.mark.slow
def test_the_flow_emits_events_through_prefect(home):
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.watch import watch_sources
    from tessera.core.paths import apply_engine_defaults

    apply_engine_defaults()
    name, location = table(home)
    docs = home / "volumes" / "main" / "default" / "docs"
    docs.mkdir(parents=True)
    (docs / "a.txt").write_text("first")
    watch(name)
    watch("dbfs:/Volumes/main/default/docs")
    write_deltalake(location, rows("c"), mode="append")
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        changes = watch_sources(quiet_seconds=0)
        assert [(c.source, c.version) for c in changes] == [(name, 1)]
        assert watch_sources(quiet_seconds=0) == []

        from prefect._internal.concurrency.services import _QueueServiceBase
        from prefect.client.orchestration import get_client

        _QueueServiceBase.drain_all(timeout=30, at_exit=False)  # events still on their way to the server
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 30
            while True:  # the server stores the events it received in batches
                events = client.read_events(EventFilter(event=EventNameFilter(name=["tessera.data.updated"])), limit=50).events
                if events or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
    [event] = events
    assert event.id == changes[0].event_id
    assert event.resource.id == changes[0].resource_id
    assert event.resource["tessera.source"] == name
    assert event.payload["version"] == 1 and event.payload["data_path"] == f"{name}@v1"
