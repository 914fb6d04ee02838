"""Files and folders: a file set's content, each file (hidden ones skipped, links to folders not followed) with its
size and sha256, and one hash over them all. A file whose size and mtime are unchanged is not hashed again."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from tasks.watch.targets import Target
from tessera.core.errors import TesseraError

_HASH_CHUNK = 1 << 20


def observe_files(target: Target, previous: dict | None) -> dict:
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
