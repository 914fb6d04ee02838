"""The promotion decision, pure: the challenger's metric against the incumbent's, lower is better, by a margin; and a
challenger that ends clearly fewer of its greedy answers than the incumbent (it loops) never wins."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel

from tessera.core.errors import ConfigError

Metric = Literal["eval_loss", "eval_perplexity"]  # both lower-is-better, per trained token of the eval set
MarginMode = Literal["relative", "absolute"]
# A challenger whose greedy answers end their turn less often than the incumbent's by more than this (a share of the
# stop-check prompts, tasks/train/evaluation.py) is refused, whatever its loss: with a handful of prompts, one answer
# either way is noise, a drop of more than a quarter is a model that started to loop.
STOP_RATE_MARGIN = 0.25


class Decision(BaseModel):
    promote: bool
    metric: str
    challenger: str  # models:/name/N
    challenger_value: float
    incumbent: str  # models:/name/M (the champion) or "base model <name>"
    incumbent_value: float
    margin: float
    margin_mode: str
    threshold: float  # the challenger's value had to be below this
    reason: str
    challenger_stop_rate: float | None = None  # as the train stage logged them (None: not a chat run, or not logged)
    incumbent_stop_rate: float | None = None


def decide(
    challenger: str, challenger_value: float, incumbent: str, incumbent_value: float, *,
    metric: str = "eval_loss", margin: float = 0.0, margin_mode: str = "relative",
    challenger_stop_rate: float | None = None, incumbent_stop_rate: float | None = None,
) -> Decision:
    """Lower is better. Promote iff challenger_value < threshold, where threshold = incumbent_value * (1 - margin)
    (relative) or incumbent_value - margin (absolute). Margin 0: strictly better; a tie keeps the incumbent.
    A value that is not finite never wins, nor does a challenger whose stop rate is more than STOP_RATE_MARGIN
    below the incumbent's (when both are known)."""
    if margin_mode not in ("relative", "absolute"):
        raise ConfigError(f"margin_mode {margin_mode!r}: expected 'relative' or 'absolute'")
    if not (margin >= 0 and math.isfinite(margin)) or (margin_mode == "relative" and margin >= 1):
        raise ConfigError(f"promotion_margin {margin}: expected >= 0 (and < 1 when relative)")
    threshold = incumbent_value * (1 - margin) if margin_mode == "relative" else incumbent_value - margin
    promote = math.isfinite(challenger_value) and math.isfinite(threshold) and challenger_value < threshold
    by = f"{margin:.2%}" if margin_mode == "relative" else f"{margin:g}"
    needed = f"below {threshold:.6g} ({incumbent} {incumbent_value:.6g}, margin {by} {margin_mode})"
    if promote:
        reason = f"{metric} {challenger_value:.6g} is {needed}"
    else:
        reason = f"{metric} {challenger_value:.6g} is not {needed}"
    if None not in (challenger_stop_rate, incumbent_stop_rate) and challenger_stop_rate < incumbent_stop_rate - STOP_RATE_MARGIN:
        promote = False
        reason += (f"; its greedy answers end their turn {challenger_stop_rate:.0%} of the time, {incumbent}'s "
                   f"{incumbent_stop_rate:.0%} (more than {STOP_RATE_MARGIN:.0%} fewer): it may loop")
    return Decision(
        promote=promote, metric=metric, challenger=challenger, challenger_value=challenger_value, incumbent=incumbent,
        incumbent_value=incumbent_value, margin=margin, margin_mode=margin_mode, threshold=threshold, reason=reason,
        challenger_stop_rate=challenger_stop_rate, incumbent_stop_rate=incumbent_stop_rate,
    )
