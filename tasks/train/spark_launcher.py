"""Spark's TorchDistributor as the launcher of the training processes (training_config launcher: spark), for teams
whose GPUs sit in a Spark cluster:

    python -m tasks.train.spark_launcher JOB.json

The train stage starts it in place of torchrun (tasks.train.nodes.worker_command). It opens a session on the run's
data_prep_cluster_id (local[N]: this machine, TorchDistributor's local mode), runs the trainer's worker in
nproc_per_node processes, and then checks how every rank ended. TorchDistributor's wrapper exits 0 whatever torchrun
returns, and returns whichever rank finished last (STACK.md): so each rank writes its own outcome file, and a rank
that failed, or never wrote one, fails the run, named. The job, the data and the checkpoints are reached from the
executors as in a run over several nodes: a TESSERA_HOME on shared storage.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from tasks.train.report import PEERS_LOST_MARKER, PREEMPTED_EXIT, fail, outcomes
from tessera.core.errors import TesseraError
from tessera.core.paths import write_atomic


def launch(cluster: str, nproc: int, train: Callable, *args, outcome_dir: str | Path) -> dict[int, int | None]:
    """Run `train(*args)` in `nproc` processes through TorchDistributor on `cluster`, each writing its outcome under
    `outcome_dir` (emptied first); returns every rank's exit code, whatever TorchDistributor said."""
    import torch
    from pyspark.ml.torch.distributor import TorchDistributor

    from tessera.core.sources.spark import spark_session

    shutil.rmtree(outcome_dir, ignore_errors=True)
    Path(outcome_dir).mkdir(parents=True)
    with spark_session(cluster):
        distributor = TorchDistributor(num_processes=nproc, local_mode=cluster.startswith("local"),
                                       use_gpu=torch.cuda.is_available())
        try:
            distributor.run(train, *args)
        except Exception as exc:  # noqa: BLE001 - the ranks' own outcomes say what happened
            print(f"TorchDistributor: {type(exc).__name__}: {str(exc)[-2000:]}", file=sys.stderr, flush=True)
    return outcomes(outcome_dir, nproc)


def verdict(ended: dict[int, int | None]) -> int:
    """The launcher's exit code from every rank's: 0 only when each rank said it ended well; the one line the train
    stage shows otherwise, naming the ranks."""
    failed = {rank: code for rank, code in ended.items() if code != 0}
    if not failed:
        return 0
    if all(code == PREEMPTED_EXIT for code in failed.values()):
        return PREEMPTED_EXIT
    silent = [rank for rank, code in failed.items() if code is None]
    if len(silent) == len(failed):  # killed without a word: a lost process, which a retry may get past
        print(PEERS_LOST_MARKER + f"training rank(s) {', '.join(map(str, silent))} ended without reporting how "
              "(killed, or lost with their executor)", file=sys.stderr, flush=True)
        return 1
    named = ", ".join(f"rank {rank} ({'no outcome' if code is None else f'exit code {code}'})" for rank, code in failed.items())
    fail(f"training failed on {named}; every other rank: {sorted(set(ended) - set(failed)) or 'none'} ended well "
         "(the ranks' output is in the train stage's log)")
    return 1


def main(job_file: str) -> int:
    from tasks.train.worker import run
    from tessera.core.training import TrainJob

    job = TrainJob.model_validate_json(Path(job_file).read_text())
    local = job.spark_cluster.startswith("local")
    outcome_dir = Path(job.output_dir).parent / "rank_outcomes"
    # the processes watch this one (local mode); on executors elsewhere, no process of this host
    ranks = job.owned_here(outcome_dir=str(outcome_dir)) if local else job.model_copy(update={"outcome_dir": str(outcome_dir), "owner_pid": None})
    ranks_job = Path(job_file).with_name("train_job.spark.json")
    write_atomic(ranks_job, ranks.model_dump_json())
    try:
        ended = launch(job.spark_cluster, job.settings.nproc_per_node, run, str(ranks_job), outcome_dir=outcome_dir)
    except TesseraError as exc:
        fail(str(exc))
        return 1
    return verdict(ended)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
