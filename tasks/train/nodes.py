"""How a node starts its share of a run's training processes: the command for the run's job on this node
(worker_command, which the train stage runs on node 0), and another node joining a run that trains over several
(join: `tessera runs join NAME`). Imports no Prefect and no MLflow: a joining node starts at once."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tasks.train.report import SIGTERM_GRACE_S
from tessera.core import runs
from tessera.core.config import TrainingSettings
from tessera.core.errors import TesseraError
from tessera.core.processes import stop_tree
from tessera.core.training import TrainJob


def worker_command(job_file: str, settings: TrainingSettings, run_name: str,
                   joining: bool = False) -> tuple[list[str], dict[str, str]]:
    """How this node's worker processes start, and their environment. On one node, tasks.train.standalone forks
    them as the ranks of one group on a free local port (torchrun's standalone mode, without its seconds of start).
    Over several nodes, every node's torchrun meets the others at the run's rdzv_endpoint (c10d, the run's name as
    its id), and none restarts its workers itself: a lost node fails the run, which resumes from its last
    checkpoint. The rendezvous store lives in node 0's torchrun, never in a `joining` node's: left to guess (both on
    one host, or a joined node quicker to bind the port), a joined node could hold it, and losing that node would end
    node 0's torchrun with a store error instead of its workers noticing the lost peer. Several processes on a node
    get one thread each unless OMP_NUM_THREADS says otherwise, as torchrun gives them.

    A sharded model gathers and frees every layer's weights and gradients at each micro-batch. On a CPU, glibc's
    dynamic mmap threshold then keeps those frees resident; a fixed threshold of 1 MB hands them back (measured on a
    100M-parameter model over 2 processes: a peak of 1.73 GB per process without it, 1.50 GB with it)."""
    env, nproc = dict(os.environ), settings.nproc_per_node
    if settings.parallelism == "fsdp":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    if settings.launcher == "spark":  # TorchDistributor starts them, from a process holding the Spark session
        return [sys.executable, "-m", "tasks.train.spark_launcher", job_file], env
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    if settings.nnodes > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--nnodes={settings.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={settings.rdzv_endpoint}", f"--rdzv-id={run_name}",
                f"--rdzv-conf=is_host={str(not joining).lower()}", "--max-restarts=0", "-m", "tasks.train.worker",
                job_file], env
    return [sys.executable, "-m", "tasks.train.standalone", str(nproc), "tasks.train.worker", job_file], env


def join(run_name: str, wait_s: float = 600, say: Callable[[str], None] = print) -> int:
    """This node's share of a run that trains over several nodes: waits (up to `wait_s`) for the run's train stage to
    write its job on the shared TESSERA_HOME, then starts this node's torchrun at the run's rendezvous and waits for
    it. Returns its exit code. The workers here watch this process, not node 0's stage: they stop when it is gone."""
    path = runs.job_file(run_name)
    deadline, said = time.monotonic() + wait_s, False
    while not path.is_file():  # the run may not even exist yet: the nodes are started together
        if time.monotonic() > deadline:
            raise TesseraError(f"run {run_name} did not start training within {wait_s:g} s (under {runs.runs_dir()}): "
                               "nothing to join")
        if not said:
            say(f"waiting for run {run_name} to start training ({path})")
            said = True
        time.sleep(1)
    job = TrainJob.model_validate_json(path.read_text())
    if job.settings.nnodes == 1:
        raise TesseraError(f"run {run_name} trains on one node (training_config nnodes 1): there is nothing to join")
    here = job.owned_here()
    with tempfile.TemporaryDirectory(prefix="tessera-join-") as tmp:
        local = Path(tmp) / runs.job_file(run_name).name
        local.write_text(here.model_dump_json())
        cmd, env = worker_command(str(local), job.settings, run_name, joining=True)
        say(f"joining run {run_name}: {job.settings.nnodes} nodes of {job.settings.nproc_per_node} process(es) "
            f"at {job.settings.rdzv_endpoint}")
        proc = subprocess.Popen(cmd, env=env)
        try:
            return proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: the workers stop too (they are in sessions of their own)
            stop_tree(proc.pid, grace=SIGTERM_GRACE_S, popen=proc)
            raise
