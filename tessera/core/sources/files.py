"""Local files and folders as paths: the .txt documents under a folder (and the files skipped there, by reason),
how a document is named, and a file's content hash.

The lowest module of the package: a Source's fingerprint and skipped files are this listing, and both engines
read the documents it lists (the in-process reader, and Spark, whose own listing would drop `_thread.txt`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from tessera.core.paths import is_volume_path, resolve_data_path


def text_files(folder: Path, path: str) -> tuple[list[tuple[str, Path]], dict[str, int]]:
    """(relative path, file) of every .txt document under `folder`, sorted, and the files skipped, counted
    by reason. Only hidden names (a leading `.`: `.git/`, `.DS_Store`) are skipped; a leading `_` is an
    ordinary name (`_thread.txt`, `_static/`). In a volume, a file that links out of it is refused."""
    found, skipped = [], Counter()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            if d.startswith("."):  # every file inside counts: that is what the user would lose
                skipped["in a hidden folder"] += sum(len(f) for _, _, f in os.walk(Path(root) / d))
            elif (Path(root) / d).is_symlink():  # os.walk does not follow it
                skipped["link to a folder (not followed)"] += 1
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                skipped["hidden file"] += 1
            elif not name.endswith(".txt"):
                skipped["not a .txt file"] += 1
            else:
                rel = (Path(root) / name).relative_to(folder).as_posix()
                if is_volume_path(path):  # a link out of the volume is refused, here, once per file
                    resolve_data_path(document_name(path, rel))
                found.append((rel, Path(root) / name))
    return sorted(found), dict(sorted(skipped.items()))


def document_name(path: str, rel: str) -> str:
    """A document in the folder `path`, named as the user named the folder."""
    return f"{path.rstrip('/')}/{rel}"


def hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
