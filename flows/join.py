"""Join a run that trains over several nodes (training_config nnodes): this node's share of its training processes,
started by a Prefect worker on the node (a work pool per GPU node, or a Kubernetes work pool that starts one pod per
node). Composition only; the logic is in tasks/train/nodes.py, which `tessera runs join NAME` runs too."""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks.train.nodes import join
from tessera.core.errors import TesseraError


@flow(name="join-training")
def join_training(run_name: str) -> None:
    """Start this node's training processes for `run_name` and wait for them.

    Args:
        run_name: the run to join, as its train stage on node 0 prints it (`tessera runs join NAME`); its TESSERA_HOME must be shared storage this node reads
    """
    code = join(run_name, say=get_run_logger().info)
    if code != 0:
        raise TesseraError(f"this node's training processes for run {run_name} exited with code {code}: the run's events say why")
