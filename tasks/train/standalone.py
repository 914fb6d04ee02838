"""A run's training processes on one node, started as `torchrun --standalone` starts them, without torchrun's cost.

    python -m tasks.train.standalone NPROC MODULE ARGS...

torchrun is a Python process of its own that imports torch (~2.5 CPU-s) and starts each worker cold (~3.5 CPU-s of
imports each) before the first step. This launcher forks the workers from itself instead. The train stage starts it
from the fork server (tessera.core.forkserver), so it holds the workers' imports already and each worker starts warm;
started cold (a machine with GPUs, TESSERA_FORKSERVER=0), it has imported nothing heavy, and each worker imports
after the fork as under torchrun (CUDA is first touched in the worker).

What the train stage relies on, it does as torchrun does:
- each worker gets the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...), a
  session of its own, and this process's output;
- a worker that fails has the others stopped: SIGTERM, then SIGKILL after SIGTERM_GRACE_S; if the launcher itself
  is killed, its workers die with it (and a retry never finds the last attempt's workers training on);
- SIGTERM or SIGINT here goes to every worker (each saves a checkpoint and exits: a preemption, a cancel);
- it ends as its first failed worker ended: with the same exit code, or killed by the same signal (a worker killed
  by SIGKILL reads as -9 to the stage, as the out-of-memory killer's kills do); 0 when every one succeeded.
Over several nodes the run uses torchrun, whose rendezvous meets the other nodes (tasks.train.nodes).
"""

from __future__ import annotations

import os
import signal
import sys

from tasks.train.report import SIGTERM_GRACE_S
from tessera.core.forkserver import run_as_main
from tessera.core.processes import die_with_parent, free_port

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables torchrun gives a worker of a group of `world` on this node, meeting at 127.0.0.1:`port`."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "GROUP_RANK": "0", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")}


def start_workers(nproc: int, module: str, args: list[str]) -> set[int]:
    """Fork `nproc` processes running `python -m MODULE ARGS` as the ranks of one group; their pids."""
    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    pids, launcher = set(), os.getpid()
    for rank in range(nproc):
        env = dict(os.environ, **rank_env(rank, nproc, port))
        pid = os.fork()
        if pid == 0:
            die_with_parent(launcher)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            run_as_main(module, args, env, os.getcwd(), os.dup(1))
        pids.add(pid)
    return pids


def main(nproc: int, module: str, args: list[str]) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # one sent while the ranks start waits for the handler
    running = start_workers(nproc, module, args)
    stopping = []

    def stop(*_) -> None:
        """Every worker still running gets SIGTERM once (a second one could land in its exit), SIGKILL after the grace."""
        if not stopping:
            stopping.append(True)
            for pid in running:
                os.kill(pid, signal.SIGTERM)
            signal.alarm(SIGTERM_GRACE_S)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGALRM, lambda *_: [os.kill(pid, signal.SIGKILL) for pid in running])
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    first_failure = 0
    while running:
        pid, status = os.wait()  # a signal's handler runs in it, and the wait goes on
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and first_failure == 0:
            first_failure = code
            stop()
    if first_failure < 0:  # killed by a signal: end so too
        if -first_failure != signal.SIGKILL:
            signal.signal(-first_failure, signal.SIG_DFL)
        os.kill(os.getpid(), -first_failure)
    return first_failure


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
