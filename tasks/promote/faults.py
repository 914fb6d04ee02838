"""Test-only fault injection: the points where a retrain killed on the way must leave its model consistent."""

from __future__ import annotations

import os


def fault_point(point: str) -> None:
    """TESSERA_FAULT=<point> ends the process here, as a kill (out of memory) would."""
    if os.environ.get("TESSERA_FAULT") == point:
        raise SystemExit(f"TESSERA_FAULT={point}")
