"""Overhead benchmark: the time a local run spends outside training, from fm.create to the registered version.

    python bench/overhead.py                 # a 2-step run of the tiny model on a warm home, 3 times: medians
    python bench/overhead.py --runs 5 --home /tmp/oh
    python bench/overhead.py --nproc 2             # the same run over 2 processes (tasks/train/standalone.py)

A warm home is what a user has after their first run: the embedded Prefect server running, the base model built,
the data prepared once. The bench makes it warm with one run it does not count, then times --runs runs of the same
2-step job (2 optimizer steps of one 256-token row: training itself is well under a second) through the public SDK,
and splits each run's wall time at its own events (their timestamps):

  start     fm.create -> the flow run is Running: the run's process starts, imports the flow, Prefect starts it
  prepare   inputs checked, data prep on a cache hit
  plan      the data report, the run plan, the MLflow run
  launch    the training processes start: the worker's imports, the model and the rows loaded
  train     the training steps
  register  the model written and registered
  finish    the flow run ends, the last event read

It ends with one line: `overhead total_s=<median wall> prepare_hit_s=<median prepare on a cache hit, timed alone>`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (phase, the event that ends it: its stage and how its message starts)
PHASES = [
    ("start", ("run", "running")),
    ("prepare", ("prepare", "")),
    ("plan", ("train", "memory plan")),
    ("launch", ("train", "training ")),
    ("train", ("train", "[")),
    ("register", ("register", "registered")),
    ("finish", ("run", "completed")),
]


def event_time(event: dict) -> float:
    return dt.datetime.fromisoformat(event["time"]).timestamp()


def one_run(fm, data: str, nproc: int) -> tuple[float, dict[str, float]]:
    started = time.time()
    run = fm.create(model="tessera/tiny-chat", train_data_path=data, register_to="main.bench.overhead",
                    training_duration="2ba", training_config={"nproc_per_node": nproc})
    events = list(fm.get_events(run.name, follow=True, poll=0.05))
    wall = time.time() - started
    status = fm.get(run.name)
    if status.status.value != "COMPLETED":
        raise SystemExit(f"run {run.name} {status.status.value}: {status.details}")
    phases, last = {}, started
    for phase, (stage, prefix) in PHASES:
        ends = [event_time(e) for e in events if e["stage"] == stage and e["message"].startswith(prefix)]
        end = max(ends) if phase == "train" else min(ends)  # train ends at its last progress line
        phases[phase], last = end - last, end
    phases["finish"] += wall - (last - started)  # reading the last event back
    return wall, phases


def prepare_hit(data: str) -> float:
    """Data prep alone on a cache hit, in this process (as the flow's task runs it)."""
    from tasks.prepare.stage import prepare
    from tessera.core.config import build_run_config
    from tessera.core.run_plan import resolve_run

    config = resolve_run(build_run_config(model="tessera/tiny-chat", train_data_path=data,
                                          register_to="main.bench.overhead", training_duration="2ba")).config
    prepare(config)  # imports and the tokenizer's first load are not the cache's cost
    started = time.perf_counter()
    prepare(config)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--home", type=Path, help="TESSERA_HOME to use (default: a fresh temporary one)")
    ap.add_argument("--nproc", type=int, default=1, help="training processes (nproc_per_node)")
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="tessera-overhead-"))
    os.environ["TESSERA_HOME"] = str(home)
    os.environ.pop("TESSERA_WORK_POOL", None)  # runs execute here
    from tessera import foundation_model as fm

    data = str(REPO / "tessera" / "assets" / "demo_chat.jsonl")
    t = time.time()
    one_run(fm, data, args.nproc)
    print(f"warm-up run (server start, model build, data prep): {time.time() - t:.1f} s  home {home}")
    walls, table = [], []
    for i in range(args.runs):
        wall, phases = one_run(fm, data, args.nproc)
        walls.append(wall)
        table.append(phases)
        print(f"run {i + 1}: {wall:5.1f} s  " + "  ".join(f"{k} {v:4.1f}" for k, v in phases.items()), flush=True)
    medians = {k: statistics.median(p[k] for p in table) for k in table[0]}
    print("median:   " + "  ".join(f"{k} {v:4.1f}" for k, v in medians.items()))
    hit = statistics.median(prepare_hit(data) for _ in range(3))
    if args.home is None:  # the bench's own home: its embedded Prefect server goes with it
        from tessera.core import prefect_server

        prefect_server.stop()
    print(f"overhead total_s={statistics.median(walls):.1f} prepare_hit_s={hit:.2f}")


if __name__ == "__main__":
    main()
