"""Checkpoints as files: which count (complete ones only), which are kept, when one is due. The saves and resumes
themselves run for real in tests/test_trainer.py and tests/test_runs.py."""

from __future__ import annotations

import datetime as dt

import pytest


def info(step: int, eval_loss: float | None = None):
    from tessera.core.checkpoints import CheckpointInfo

    return CheckpointInfo(step=step, epoch=step / 10, tokens_seen=100 * step, eval_loss=eval_loss, world_size=1, seed=0,
                          reason="interval", saved_at=dt.datetime.now(dt.timezone.utc))


def save(root, step: int, eval_loss: float | None = None, complete: bool = True):
    """A checkpoint folder as the worker leaves it: DCP's files, then (once complete) the mark."""
    from tessera.core import checkpoints

    path = checkpoints.folder(root, step)
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"tensors")
    if complete:
        (path / ".metadata").write_bytes(b"dcp")
        checkpoints.mark_complete(path, info(step, eval_loss))
    return path


def test_a_save_cut_short_is_never_resumed_from_and_goes_once_a_later_one_is_complete(tmp_path):
    """A worker killed during a save leaves a folder without the mark (and perhaps without DCP's .metadata)."""
    from tessera.core import checkpoints

    save(tmp_path, 7)
    cut = save(tmp_path, 14, complete=False)
    assert checkpoints.latest(tmp_path).step == 7
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [7]
    assert checkpoints.prune(tmp_path, keep=3) == []  # it may still be being written: nothing newer is complete
    save(tmp_path, 21)
    assert checkpoints.prune(tmp_path, keep=3) == [cut]
    assert checkpoints.latest(tmp_path).path.endswith("step_00000021")


def test_the_last_k_are_kept_with_the_best_by_eval_loss(tmp_path):
    from tessera.core import checkpoints

    for step, loss in [(10, 2.0), (20, 0.5), (30, 1.0), (40, 1.5), (50, 1.2)]:
        save(tmp_path, step, loss)
    removed = checkpoints.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step_00000010", "step_00000030"]
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [20, 40, 50]
    assert checkpoints.resumable_note(tmp_path, "r1") == "; resumable from step 50 (epoch 5.00): tessera runs resume r1"
    assert checkpoints.resumable_note(tmp_path / "none", "r1") == ""


@pytest.mark.parametrize(
    "steps_per_epoch, total, every, expected",
    [
        (60, 150, None, [60, 120, 150]),  # every epoch, and the end
        (1, 120, None, [50, 100, 120]),  # one-step epochs: one per eval_every (50) steps, and the end
        (30, 130, None, [60, 120, 130]),  # short epochs: the first epoch end past each multiple of 50, and the end
        (20, 60, 7, [7, 14, 21, 28, 35, 42, 49, 56, 60]),  # every 7 steps when set, and the end
    ],
)
def test_when_a_checkpoint_is_due(steps_per_epoch, total, every, expected):
    from types import SimpleNamespace

    from tasks.train.worker import checkpoint_due

    plan = SimpleNamespace(steps_per_epoch=steps_per_epoch, total_steps=total)
    assert [d for d in range(1, total + 1) if checkpoint_due(d, plan, every, eval_every=50)] == expected
