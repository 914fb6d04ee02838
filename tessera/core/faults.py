"""Test-only fault injection: the points where a process killed on the way must leave its run consistent (a retrain
killed before its model's alias moves; a training worker killed while a checkpoint is being written).

TESSERA_FAULT=<point> ends the process at that point; with TESSERA_FAULT_ONCE=<file>, only the first time (the
file is created then): a restarted process goes past it."""

from __future__ import annotations

import os
import signal


def fault_point(point: str, kill: bool = False) -> None:
    """End the process here when TESSERA_FAULT names `point`: by SystemExit, or with `kill` by SIGKILL (nothing of
    the process runs after it, as after an out-of-memory kill)."""
    if os.environ.get("TESSERA_FAULT") != point:
        return
    once = os.environ.get("TESSERA_FAULT_ONCE")
    if once:
        try:
            with open(once, "x"):
                pass
        except FileExistsError:
            return
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit(f"TESSERA_FAULT={point}")
