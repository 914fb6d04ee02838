"""An endpoint's record and its files: the name, the record's shape (EndpointRecord, Backend, EndpointStatus), where
it is kept under TESSERA_HOME/endpoints, and the lock held while a command changes the endpoint."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from enum import Enum
from pathlib import Path

from pydantic import BaseModel

from tasks.serve.settings import ServeSettings
from tessera.core import registry
from tessera.core.errors import ConfigError, LockTimeout, TesseraError
from tessera.core.paths import file_lock, is_locked, tessera_home, write_atomic

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


class EndpointStatus(str, Enum):
    STARTING = "STARTING"  # `serve` is bringing it up
    READY = "READY"  # router and backend are ours, alive, and /readyz answers
    UPDATING = "UPDATING"  # an update is checking a new version; the old one serves
    NOT_READY = "NOT_READY"  # the processes are alive but /readyz does not answer
    FAILED = "FAILED"  # a process is gone, or the endpoint never started
    STOPPED = "STOPPED"  # `stop` stopped it


class Backend(BaseModel):
    """One `bentoml serve` process serving one model version."""

    model_uri: str  # what the server was given: always the version (models:/name/N), never an alias
    version: str  # the registered version it serves
    url: str
    pid: int
    create_time: float
    log: str
    started_at: dt.datetime
    # its limits, from the environment it was started with: the router applies its body limit, and an update
    # lets its requests run to their time limit (a record written before they were kept: the defaults)
    settings: ServeSettings = ServeSettings()


class EndpointRecord(BaseModel):
    name: str
    model_uri: str  # what the endpoint serves: models:/name@alias (followed) or models:/name/N
    follow: bool  # re-resolve the alias on update
    registered_model: str
    version: str | None = None  # the version being served
    host: str
    port: int
    url: str
    api_key: str | None = None
    router_pid: int | None = None
    router_create_time: float | None = None
    backend: Backend | None = None
    candidate: Backend | None = None  # a version being started or checked
    status: EndpointStatus = EndpointStatus.STARTING
    created_at: dt.datetime
    updated_at: dt.datetime
    details: str | None = None
    history: list[str] = []  # one line per change of version, oldest first

    @property
    def local_url(self) -> str:
        """The router as this machine reaches it (a router on 0.0.0.0 answers on 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def endpoints_dir() -> Path:
    return tessera_home() / "endpoints"


def record_file(name: str) -> Path:
    return endpoints_dir() / f"{name}.json"


def logs_dir(name: str) -> Path:
    return endpoints_dir() / name


def default_name(model_uri: str) -> str:
    """An endpoint's name when none is given: the model's own (last) name, `main.support.bot` -> `bot`."""
    model = registry.parse_model_uri(model_uri).name.split(".")[-1]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", model).strip("-_") or "endpoint"
    return name[:63]


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"endpoint name {name!r}: use letters, digits, '-' and '_' (at most 63, starting with a letter or digit)")
    return name


def save(record: EndpointRecord) -> EndpointRecord:
    """Write atomically (the router re-reads the file when it changes), readable by its owner only."""
    write_atomic(record_file(record.name), record.model_dump_json(indent=2))
    return record


def load(name: str) -> EndpointRecord:
    """The record as last written; `get` adds the processes' current state."""
    path = record_file(check_name(name))
    if not path.exists():
        raise TesseraError(f"no endpoint named {name!r} (endpoints live in {endpoints_dir()}; see tessera endpoints list)")
    return EndpointRecord.model_validate_json(path.read_text())


_held: set[str] = set()  # endpoints this process is changing


def _lock_file(name: str) -> Path:
    return endpoints_dir() / f"{name}.lock"


@contextlib.contextmanager
def changing(name: str, wait: bool = False):
    """Held while a command changes an endpoint: one serve/update/stop at a time. Released if its holder dies.
    With `wait`, a command waits its turn (an update behind another: back-to-back retrains that both promote);
    without, a lock held for more than a moment (another command at work) is an error."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(_lock_file(name), timeout=None if wait else 2))  # probes hold it an instant
        except LockTimeout:
            raise TesseraError(
                f"endpoint {name}: another command is changing it (serve, update or stop); try again when it ends"
            ) from None
        _held.add(name)
        held.callback(_held.discard, name)
        yield


def being_changed(name: str) -> bool:
    """Whether another process is serving, updating or stopping the endpoint now."""
    return name not in _held and is_locked(_lock_file(name))
