"""Token-level sparse MoE: routers, capacity, grouped experts, HyperMoE, shared experts, the layer."""

from raymoe.moe.token.bias_balance import BiasBalancer
from raymoe.moe.token.experts import TokenExperts
from raymoe.moe.token.hypermoe import HyperMoE, HyperNetwork
from raymoe.moe.token.layer import TokenMoE
from raymoe.moe.token.routers import (AttentiveRouter, ExpertChoiceRouter, NoisyTopKRouter, TokenChoiceRouter,
                                      TokenRouter, TopKRouter)

__all__ = ["AttentiveRouter", "BiasBalancer", "ExpertChoiceRouter", "HyperMoE", "HyperNetwork", "NoisyTopKRouter",
           "TokenChoiceRouter", "TokenExperts", "TokenMoE", "TokenRouter", "TopKRouter"]
