"""The watcher's durable state in `$TESSERA_HOME/watch/`: the registry (`sources.json`), what each check saw
(`state.json`), both written atomically, and the lock that lets one check or registry change at a time."""

from __future__ import annotations

import json
from pathlib import Path

from tessera.core.errors import TesseraError
from tessera.core.paths import file_lock, tessera_home, write_atomic


def watch_dir() -> Path:
    return tessera_home() / "watch"


def state_path() -> Path:
    return watch_dir() / "state.json"


def registry_path() -> Path:
    return watch_dir() / "sources.json"


def watch_lock():
    """One check or registry change at a time (scheduled runs may overlap)."""
    return file_lock(watch_dir() / ".lock")


def load_json(path: Path, empty: dict) -> dict:
    """A JSON file, or `empty` (a copy) when there is none yet."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return json.loads(json.dumps(empty))
    except json.JSONDecodeError as exc:
        raise TesseraError(f"{path}: not valid JSON ({exc}); fix or remove it") from None
    return data


def save_json(path: Path, data: dict) -> None:
    """The state or the registry, in its file format (1)."""
    write_atomic(path, json.dumps({"format": 1, **data}, indent=1, sort_keys=True))
