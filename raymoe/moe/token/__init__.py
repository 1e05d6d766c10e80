"""Token-level sparse MoE: capacity, grouped experts, HyperMoE, shared experts, the layer (routers: moe/routers.py)."""

from raymoe.moe.token.experts import TokenExperts
from raymoe.moe.token.hypermoe import HyperMoE, HyperNetwork
from raymoe.moe.token.layer import TokenMoE

__all__ = ["HyperMoE", "HyperNetwork", "TokenExperts", "TokenMoE"]
