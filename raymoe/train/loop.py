"""The one training function: `raymoe train`, Ray Train workers and Tune trials all call `train_fn`."""

from __future__ import annotations

from typing import Any


def train_fn(loop_config: dict[str, Any]) -> dict[str, float]:
    """Train one experiment described by `make_loop_config(...)`; returns the final metrics."""
    raise NotImplementedError("train_fn is being written (helper E)")
