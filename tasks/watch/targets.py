"""Where a watched source is and what it is: a data path resolved to a Delta table or a file set, under an id that
stays the same however the path is written."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from tessera.core import sources
from tessera.core.errors import TesseraError
from tessera.core.paths import is_volume_path, resolve_data_path

RESOURCE_PREFIX = "tessera.dataset."


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
