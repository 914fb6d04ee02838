"""Saving and loading a training run's state, sharded: no rank ever gathers the whole state.

One checkpoint is one folder (tessera.core.checkpoints): the model and AdamW states written by
torch.distributed.checkpoint (DCP: each rank writes its share, replicated tensors once, the coordinator's `.metadata`
last), each rank's random state in a file of its own (DCP keeps one copy per key, STACK.md), and `checkpoint.json`,
which rank 0 writes once all of that is on disk: a checkpoint counts only then. The learning rate is a function of
the step, and the data order one of (seed, epoch), so the step number is the whole of the scheduler and the exact
data position.

Saves are asynchronous: the state is copied off the training tensors, then written by a background thread on a
process group of its own (on the training group, the save's collectives interleave with the gradient all-reduce and
both ranks hang: STACK.md). One save at a time: the next one, or the end, waits for the previous. The last save and
a preemption's are written at once, with no staged copy: nothing trains meanwhile, and the copy costs as much memory
as the process's share of the weights and AdamW states.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tasks.train import distributed
from tessera.core import checkpoints
from tessera.core.checkpoints import CheckpointInfo
from tessera.core.faults import fault_point
from tessera.core.weights import architecture


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_rank{rank}.pt"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Checkpointer:
    """The worker's checkpoints under `root`: save (async), wait, load, and keep the last `keep`."""

    def __init__(self, root: Path, model, optimizer, rank: int, keep: int, device: torch.device, say=lambda line: None):
        self.root, self.model, self.optimizer, self.rank, self.keep = Path(root), model, optimizer, rank, keep
        self.device, self.say = device, say  # say: a line for the run's events (rank 0's is shown)
        # what one checkpoint takes on disk: the fp32 weights and AdamW's two states for each
        self.size_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        self.group = dist.new_group(backend="gloo")  # every rank creates it, in the same order
        self._pending: tuple | None = None  # (future, info, folder) of the save being written

    def state(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, info: CheckpointInfo, wait: bool = False) -> None:
        """Start writing a checkpoint of the state as it is now; the training may change it as soon as this returns.
        With `wait`, write it now and return once it is complete."""
        self.wait()
        if self._short_of_space():
            return
        path = checkpoints.folder(self.root, info.step)
        if self.rank == 0 and path.exists():  # a save of this step that a kill cut short, or a run re-executed
            shutil.rmtree(path)
        dist.barrier(group=self.group)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), _rng_file(path, self.rank))
        if wait:  # nothing to overlap (the end, a preemption): written from the training tensors, with no staged copy
            dcp.save(self.state(), checkpoint_id=str(path), process_group=self.group)
            future = concurrent.futures.Future()
            future.set_result(None)
        else:
            future = dcp.async_save(self.state(), checkpoint_id=str(path), process_group=self.group)
        self._pending = (future, info, path)
        if wait:
            self.wait()

    def _short_of_space(self) -> bool:
        """Whether the disk under the checkpoints has less room than a checkpoint takes (rank 0 looks, every rank
        follows its answer); if so the run goes on without this checkpoint, and says so."""
        free = None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
        if not distributed.any_rank(free is not None and free < self.size_bytes, self.device):
            return False
        self.say(f"warning: checkpoint skipped: {free / 1e9:.2f} GB free under {self.root}, a checkpoint takes "
                 f"{self.size_bytes / 1e9:.2f} GB; free some space or set training_config checkpoint_dir to a larger disk")
        return True

    def wait(self) -> None:
        """Finish the save in flight, if any, and mark it complete."""
        if self._pending is not None:
            self._pending[0].result()
            self._finished()

    def poll(self) -> None:
        """Mark the save in flight complete if it is written (once a step: a checkpoint counts as soon as it can)."""
        if self._pending is not None and self._pending[0].done():
            self._finished()

    def _finished(self) -> None:
        """Rank 0's save ends after DCP's coordinator (rank 0) gathered every rank's write results and wrote
        `.metadata`, and every rank wrote its random state before saving: so rank 0 alone marks it complete, with no
        collective that ranks polling at different moments could deadlock on. The oldest beyond `keep` then go."""
        future, info, path = self._pending
        self._pending = None
        future.result()  # a failed write raises here
        if self.rank == 0:
            fault_point(f"checkpoint-{info.step}-written-not-marked", kill=True)
            checkpoints.mark_complete(path, info)
            checkpoints.prune(self.root, self.keep)
            loss = f", eval loss {info.eval_loss:.4f}" if info.eval_loss is not None else ""
            self.say(f"checkpoint at {info.label} ({info.reason}{loss}): {path}")

    def load(self, info: CheckpointInfo) -> None:
        """The model, optimizer and (when the number of processes is the same) random states of a checkpoint."""
        path = Path(info.path)
        state = self.state()
        dcp.load(state, checkpoint_id=str(path), process_group=self.group)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if info.world_size == dist.get_world_size() and _rng_file(path, self.rank).exists():
            set_rng_state(torch.load(_rng_file(path, self.rank), weights_only=False))


def info_now(step: int, plan, tokens_seen: int, world: int, reason: str, train_loss: float | None,
             eval_loss: float | None, base_stop_check: dict | None, model_config: dict) -> CheckpointInfo:
    return CheckpointInfo(
        step=step, epoch=step / plan.steps_per_epoch, tokens_seen=tokens_seen, train_loss=train_loss,
        eval_loss=eval_loss, world_size=world, seed=plan.seed, reason=reason,
        saved_at=dt.datetime.now(dt.timezone.utc), base_stop_check=base_stop_check, architecture=architecture(model_config),
    )
