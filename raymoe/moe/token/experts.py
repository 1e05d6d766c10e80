"""Token-level FFN experts with stacked weights: expert e computes GELU(x W1_e + b1_e) W2_e + b2_e.

Shape legend: E experts held here (num_local; all of them until shard()), D model dim, F expert hidden dim,
R rows grouped by local expert (expert-major), H attentive-gate key dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.moe.expert_stack import ExpertStack
from raymoe.moe.token.grouped import Impl, grouped_ffn


class TokenExperts(ExpertStack):
    """num_experts GELU FFNs D -> F -> D; every parameter has the leading (local) expert dim."""

    def __init__(self, num_experts: int, dim: int, d_ff: int, impl: Impl = "auto"):
        super().__init__(num_experts)
        self.dim, self.d_ff, self.impl = dim, d_ff, impl
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, dim, d_ff))
        self.b1_EF = nn.Parameter(torch.empty(num_experts, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, dim))
        self.b2_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like a pair of nn.Linear layers: U(+-1/sqrt(fan_in))."""
        for p, fan_in in ((self.w1_EDF, self.dim), (self.b1_EF, self.dim), (self.w2_EFD, self.d_ff),
                          (self.b2_ED, self.d_ff)):
            nn.init.uniform_(p, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward_grouped(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Local expert i runs on the i-th contiguous group of counts[i] rows.

        Args:
            x_RD: rows grouped by local expert.
            counts: rows per local expert, len == num_local.
        Returns:
            y_RD in the same row order.
        """
        if len(counts) != self.num_local:
            raise ValueError(f"got {len(counts)} groups for {self.num_local} local experts")
        w1, b1, w2, b2 = (p.to(x_RD.dtype) for p in (self.w1_EDF, self.b1_EF, self.w2_EFD, self.b2_ED))
        return grouped_ffn(x_RD, w1, b1, w2, b2, counts, "gelu", self.impl)

    def hidden_keys(self, x_ND: torch.Tensor, w_k_FH: torch.Tensor) -> torch.Tensor:
        """k_e(x) = (x W1_e + b1_e) W_k for every expert e: the attentive gate's keys (all experts needed).

        The pre-activation hidden layer is linear in x, so W1_e W_k is folded first: O(E D H) per token
        instead of O(E D F).

        Returns:
            keys_NEH.
        """
        if self.num_local != self.num_experts:
            raise RuntimeError("the attentive gate needs every expert's hidden layer; it does not support "
                               "expert parallelism (scaling.expert_parallel must be 1)")
        w_k = w_k_FH.to(x_ND.dtype)
        m_DEH = torch.einsum("edf,fh->deh", self.w1_EDF.to(x_ND.dtype), w_k)
        c_EH = self.b1_EF.to(x_ND.dtype) @ w_k
        keys = x_ND @ m_DEH.reshape(self.dim, -1)
        return keys.view(x_ND.shape[0], self.num_experts, -1) + c_EH
