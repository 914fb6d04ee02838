"""A training run's checkpoints: where they live, which are complete, what each holds, and which are kept.

The training worker writes them (tasks/train/checkpoint.py: model and optimizer sharded with
torch.distributed.checkpoint, each rank's random state beside them); this module reads folders and JSON, so
fm.get_checkpoints and `tessera runs checkpoints` list them without torch (only load_model_weights imports it). A
checkpoint is a folder `step_<N>` under the run's checkpoint root; it counts only once `checkpoint.json` is in it,
which rank 0 writes after every rank's data and DCP's own `.metadata` are on disk. A folder without it (a save that
a kill cut short) is never resumed from, and is removed once a later checkpoint is complete.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tessera.core.paths import write_atomic

INFO_FILE = "checkpoint.json"
FOLDER_PREFIX = "step_"


class CheckpointInfo(BaseModel):
    """What one checkpoint holds beyond the tensors: where the run stood when it was saved."""

    step: int  # optimizer steps done; the run continues with step `step` (0-based)
    epoch: float  # epochs done, counting the part of the current one
    tokens_seen: int  # non-padding input tokens trained on so far
    train_loss: float | None = None  # the last logged training loss
    eval_loss: float | None = None  # on eval_data_path, evaluated for this checkpoint
    world_size: int  # processes that saved it (a resume with another number reshards)
    seed: int  # the data order's seed: with the step, the exact position in the data
    reason: str  # epoch, interval, final or preempted (SIGTERM)
    saved_at: dt.datetime
    base_stop_check: dict[str, float] | None = None  # the base model's stop check, which a resume does not redo
    architecture: dict[str, Any] = {}  # the model's shape (tessera.core.weights), checked when another run starts from it
    path: str = ""  # filled in when listed

    @property
    def label(self) -> str:
        return f"step {self.step} (epoch {self.epoch:.2f})"


def folder(root: Path, step: int) -> Path:
    return Path(root) / f"{FOLDER_PREFIX}{step:08d}"


def mark_complete(path: Path, info: CheckpointInfo) -> None:
    """The completeness mark: written last, atomically, by rank 0 only."""
    write_atomic(Path(path) / INFO_FILE, info.model_dump_json(indent=2, exclude={"path"}))


def _read(path: Path) -> CheckpointInfo | None:
    try:
        return CheckpointInfo.model_validate_json((path / INFO_FILE).read_text()).model_copy(update={"path": str(path)})
    except (OSError, ValueError):
        return None


def list_checkpoints(root: Path | str | None) -> list[CheckpointInfo]:
    """The complete checkpoints under `root`, oldest first."""
    if root is None or not Path(root).is_dir():
        return []
    found = [_read(p) for p in sorted(Path(root).glob(f"{FOLDER_PREFIX}*")) if p.is_dir()]
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def latest(root: Path | str | None) -> CheckpointInfo | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the last `keep` complete checkpoints and the one with the best eval loss, and every incomplete
    folder older than the newest complete one (a save cut short). Returns what was removed."""
    complete = list_checkpoints(root)
    if not complete:
        return []
    kept = {c.path for c in complete[-keep:]} if keep > 0 else set()
    scored = [c for c in complete if c.eval_loss is not None]
    if scored:
        kept.add(min(scored, key=lambda c: c.eval_loss).path)
    kept.add(complete[-1].path)  # the newest always: it is what a resume continues from
    removed = []
    for path in sorted(Path(root).glob(f"{FOLDER_PREFIX}*")):
        info = _read(path)
        stale_partial = info is None and path.name < Path(complete[-1].path).name
        if (info is not None and str(path) not in kept) or stale_partial:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def resumable_note(root: Path | str | None, name: str) -> str:
    """What a failed or stopped run's message adds when it can be continued."""
    last = latest(root)
    return f"; resumable from {last.label}: tessera runs resume {name}" if last else ""


def load_model_weights(model, folder: str | Path) -> None:
    """Only the model weights of a checkpoint, into `model` (of the architecture it was saved from): another run's,
    to start from or to score, not its optimizer or position. Works in a process group or outside one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
