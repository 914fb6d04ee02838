"""A run's checkpoints copied to its MLflow run's artifacts when those are on a remote store (a tracking server), so
that losing this machine, and the local folder the workers write to, loses nothing a resume needs.

The workers write each checkpoint to a local folder (tessera.core.checkpoints: complete once its `checkpoint.json`
is written). While they train, a thread of the train stage copies every complete one to `checkpoints/step_<N>` in
the MLflow run, its `checkpoint.json` last: there too a checkpoint counts only once that file is in it. Those the
workers prune (keep_checkpoints) are deleted there as well. A resume on a machine without the local folder (another
host, a disk lost) first downloads the newest complete one from there.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from tessera.core import checkpoints
from tessera.core.periodic import every
from tessera.core.tracking import download_folder

ARTIFACT_DIR = "checkpoints"
SYNC_EVERY_S = 2.0

log = logging.getLogger("tessera")


class CheckpointMirror:
    def __init__(self, client, run_id: str, artifact_uri: str, root: Path):
        self.client, self.run_id, self.artifact_uri, self.root = client, run_id, artifact_uri.rstrip("/"), Path(root)
        self.copied: set[str] = set()  # the folders this mirror copied: only those are deleted when pruned here

    def remote_complete(self) -> list[str]:
        """The names of the complete checkpoints in the MLflow run, oldest first."""
        folders = [f.path.rsplit("/", 1)[-1] for f in self.client.list_artifacts(self.run_id, ARTIFACT_DIR) if f.is_dir]
        return sorted(name for name in folders if name.startswith(checkpoints.FOLDER_PREFIX) and any(
            f.path.endswith("/" + checkpoints.INFO_FILE) for f in self.client.list_artifacts(self.run_id, f"{ARTIFACT_DIR}/{name}")))

    def sync(self) -> None:
        """Copy each complete local checkpoint not copied yet, mark last; delete there what was pruned here."""
        local = {Path(c.path).name: Path(c.path) for c in checkpoints.list_checkpoints(self.root)}
        for name, folder in sorted(local.items()):
            if name not in self.copied:
                self._copy(name, folder)
        for name in sorted(self.copied - local.keys()):
            self._delete(name)
            self.copied.discard(name)

    def _copy(self, name: str, folder: Path) -> None:
        try:
            files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != checkpoints.INFO_FILE)
            for f in files + [folder / checkpoints.INFO_FILE]:
                inner = f.parent.relative_to(folder).as_posix()
                self.client.log_artifact(self.run_id, str(f), f"{ARTIFACT_DIR}/{name}" + ("" if inner == "." else f"/{inner}"))
            self.copied.add(name)
        except Exception as exc:  # noqa: BLE001 - pruned meanwhile, or the store unreachable: tried again next time
            if folder.is_dir():
                log.warning("could not copy the checkpoint %s to the MLflow run's artifacts (tried again): %s", name, exc)
            self._delete(name)  # no half copy left there

    def _delete(self, name: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        with contextlib.suppress(Exception):
            get_artifact_repository(self.artifact_uri).delete_artifacts(f"{ARTIFACT_DIR}/{name}")

    def restore(self) -> None:
        """With no complete checkpoint here, download the newest complete one there (whole or not at all: a download
        cut short is never resumed from)."""
        if checkpoints.latest(self.root) is not None:
            return
        if names := self.remote_complete():
            download_folder(f"{self.artifact_uri}/{ARTIFACT_DIR}/{names[-1]}", self.root / names[-1])
            self.copied.add(names[-1])

    def while_training(self) -> contextlib.AbstractContextManager[None]:
        """Sync every SYNC_EVERY_S on a thread while the block runs, and once more at its end (however it ends)."""
        return every(SYNC_EVERY_S, self.sync, "checkpoint-mirror", last=True)
