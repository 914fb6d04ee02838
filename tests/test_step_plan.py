"""The step plan and the learning-rate schedule: exact epochs, steps and tokens."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tessera.core.config import parse_duration
from tessera.core.run_plan import default_rows_per_step
from tessera.core.training import lr_at, plan_steps


def rows_seen(plan) -> np.ndarray:
    return np.concatenate([plan.step_rows(s) for s in range(plan.total_steps)])


def test_one_epoch_trains_every_row_exactly_once():
    tokens = np.arange(1, 10) * 10  # 9 rows
    plan = plan_steps(parse_duration("1ep"), tokens, rows_per_step=8, seed=3)
    assert (plan.steps_per_epoch, plan.total_steps) == (2, 2)
    seen = rows_seen(plan)
    assert sorted(seen.tolist()) == list(range(9))  # 8 rows then the one left: nothing overshoots
    assert [len(plan.step_rows(s)) for s in range(2)] == [8, 1]
    assert plan.epochs == 1.0
    assert plan.tokens == tokens.sum()


def test_epochs_are_separate_permutations_and_never_mix():
    plan = plan_steps(parse_duration("3ep"), np.ones(10, int), rows_per_step=4, seed=0)
    assert plan.total_steps == 9
    for epoch in range(3):
        steps = range(epoch * 3, epoch * 3 + 3)
        assert sorted(np.concatenate([plan.step_rows(s) for s in steps]).tolist()) == list(range(10))
    assert not np.array_equal(plan.step_rows(0), plan.step_rows(3))  # reshuffled each epoch
    assert plan.epochs == 3.0


def test_ba_counts_optimizer_steps_across_epochs():
    plan = plan_steps(parse_duration("5ba"), np.ones(10, int), rows_per_step=4, seed=0)
    assert plan.total_steps == 5
    assert plan.epochs == pytest.approx(1 + 8 / 10)  # 3 steps of epoch 1, then 2 full steps of epoch 2
    assert plan.tokens == 10 + 8


def test_tok_stops_at_the_first_step_that_reaches_the_tokens():
    tokens = np.full(10, 100)
    plan = plan_steps(parse_duration("1_450tok"), tokens, rows_per_step=2, seed=1)
    # an epoch is 1000 tokens in 5 steps of 200; 450 more need 3 steps of the second epoch
    assert plan.total_steps == 5 + 3
    assert plan.tokens == 1600 >= 1450
    exact = plan_steps(parse_duration("1000tok"), tokens, rows_per_step=2, seed=1)
    assert exact.total_steps == 5 and exact.tokens == 1000


PLAN_IN_A_PROCESS = """
import json, numpy as np
from tessera.core.config import parse_duration
from tessera.core.training import plan_steps
plan = plan_steps(parse_duration("2ep"), np.ones(50, int), rows_per_step=7, seed=11)
print(json.dumps([plan.step_rows(s).tolist() for s in range(plan.total_steps)]))
"""


def test_plan_is_the_same_in_every_process():
    """Every rank computes the plan on its own: two processes (with different hash seeds, as two ranks may have)
    must cut the same rows into the same steps."""
    procs = [
        subprocess.Popen([sys.executable, "-c", PLAN_IN_A_PROCESS], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONHASHSEED": str(seed)})
        for seed in (1, 2)
    ]
    first, second = (json.loads(p.communicate(timeout=60)[0]) for p in procs)
    assert first == second
    assert len(first) == 16 and sorted(sum(first[:8], [])) == list(range(50))  # 2 epochs of 8 steps, every row once each


@pytest.mark.parametrize(("rows", "ctx", "expected"), [(49, 1024, 6), (8, 512, 1), (3, 512, 1), (100_000, 2048, 64)])
def test_default_global_batch_gives_at_least_8_steps_an_epoch(rows, ctx, expected):
    per_step = default_rows_per_step(rows, ctx)
    assert per_step == expected
    if rows >= 8:
        assert -(-rows // per_step) >= 8
    assert per_step * ctx <= 128 * 1024


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 10, 1e-3, 0.2) for s in range(10)]
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # 2 warmup steps, then the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # then strictly decreasing
    assert lrs[-1] == pytest.approx(1e-3 / 8)
    assert lr_at(0, 1, 1e-3, 0.1) == pytest.approx(1e-3)  # a one-step run trains at the peak
