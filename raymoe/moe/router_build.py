"""gate.* -> a router of the one family (raymoe/moe/routers.py), for either level; docs/routers.md has the table.

The levels differ in two places only: the paper's sample-level gates are dense where the paper's are (original
and attentive) and keep its output layer's bias; token routers are sparse and bias-free (Switch, GShard).
"""

from __future__ import annotations

from typing import Literal

from raymoe.config.schema import GateConfig
from raymoe.moe.routers import AttentiveRouter, ExpertChoiceRouter, LinearRouter, NoisyRouter, Router

Level = Literal["sample", "token"]


def build_router(g: GateConfig, level: Level, in_features: int, hidden: int, num_experts: int) -> Router:
    """The router of gate.kind over `in_features` router inputs (sample level: the gate trunk's width; token
    level: the model dim); `hidden` is the expert hidden width the attentive router reads its keys from."""
    sample = level == "sample"
    rate = g.bias_balance_rate
    if g.kind == "softmax" and sample:  # the original gate (docs/paper-notes.md §1.1)
        return LinearRouter(in_features, num_experts, None, temperature=g.temperature, bias=True)
    if g.kind == "topk":
        return LinearRouter(in_features, num_experts, g.top_k, g.renormalize, g.temperature, g.jitter, bias=sample,
                            bias_balance_rate=rate)
    if g.kind == "noisy_topk":
        return NoisyRouter(in_features, num_experts, g.top_k, g.renormalize, g.noise_eps, g.temperature, rate)
    if g.kind == "attentive":  # dense at the sample level, as the paper (docs/paper-notes.md §2)
        top_k = None if sample else g.top_k
        return AttentiveRouter(in_features, hidden, num_experts, top_k, g.renormalize, bias_balance_rate=rate)
    if g.kind == "expert_choice" and not sample:
        return ExpertChoiceRouter(in_features, num_experts, g.capacity_factor, g.temperature)
    raise ValueError(f"gate.kind {g.kind!r} is not a {level}-level router")
