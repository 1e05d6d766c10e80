"""The paper's MoE written literally (docs/paper-notes.md §1-3), as a researcher would write it from the notes:
a ModuleList of separate expert networks, a separate gate network, the attention module, the expectation
mixture, the NLL with eps, and the regularizers as loops. Nothing here is fast; it is the measuring stick the
fast stacked model in raymoe/models/ is checked against (tests/test_fidelity.py, `raymoe bench fidelity`).

Shape legend: B samples, E experts, C classes, H hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LiteralArch:
    """One column of the paper's architecture table (docs/paper-notes.md §1.2)."""

    conv_channels: tuple[int, ...]
    conv_bn: tuple[bool, ...]
    padding: int
    flat: int
    fc1: int
    hidden: int


# Written from the notes' table, independently of raymoe/models/paper_*.py.
EXPERTS = {
    "mnist": LiteralArch((1,), (False,), 0, 1 * 13 * 13, 5, 32),
    "fashion_mnist": LiteralArch((1,), (False,), 0, 1 * 13 * 13, 64, 32),
    "cifar10": LiteralArch((3, 6, 12, 12), (False, True, False, True), 1, 12 * 2 * 2, 64, 32),
    "cifar100": LiteralArch((8, 16, 32, 64), (False, True, False, True), 1, 64 * 2 * 2, 128, 64),
}
GATES = {
    "mnist": LiteralArch((1,), (False,), 0, 1 * 13 * 13, 128, 32),
    "fashion_mnist": LiteralArch((8,), (True,), 0, 8 * 13 * 13, 512, 32),
    "cifar10": LiteralArch((64, 128, 256, 256), (False, True, False, True), 1, 256 * 2 * 2, 512, 32),
    "cifar100": LiteralArch((64, 128, 256, 512), (False, True, False, True), 1, 512 * 2 * 2, 512, 64),
}
ATTENTIVE_TRUNK_RELU = {"mnist": False, "fashion_mnist": True, "cifar10": False, "cifar100": False}
IN_CHANNELS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3, "cifar100": 3}


class LiteralConvs(nn.Module):
    """conv -> (BatchNorm) -> ReLU -> 2x2 max-pool per stage; every conv keeps nn.Conv2d's default bias."""

    def __init__(self, arch: LiteralArch, in_channels: int):
        super().__init__()
        cins = (in_channels, *arch.conv_channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=arch.padding) for i, o in zip(cins, arch.conv_channels))
        self.bns = nn.ModuleList(nn.BatchNorm2d(o) if bn else nn.Identity()
                                 for o, bn in zip(arch.conv_channels, arch.conv_bn))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            t = F.max_pool2d(F.relu(bn(conv(t))), kernel_size=2, stride=2)
        return t.reshape(t.shape[0], -1)


class LiteralExpert(nn.Module):
    """convs -> fc1 -> ReLU -> fc2 (stored as .hidden, pre-ReLU) -> ReLU -> out -> softmax."""

    def __init__(self, dataset: str, num_classes: int):
        super().__init__()
        arch = EXPERTS[dataset]
        self.features = LiteralConvs(arch, IN_CHANNELS[dataset])
        self.fc1 = nn.Linear(arch.flat, arch.fc1)
        self.fc2 = nn.Linear(arch.fc1, arch.hidden)
        self.out = nn.Linear(arch.hidden, num_classes)
        self.hidden: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.relu(self.fc1(self.features(x)))
        self.hidden = self.fc2(t)
        return F.softmax(self.out(F.relu(self.hidden)), dim=1)


class LiteralGate(nn.Module):
    """The gate network: convs -> fc1 -> ReLU -> fc2 -> (ReLU) and, for the original gate, -> out -> softmax."""

    def __init__(self, dataset: str, num_experts: int, attentive: bool):
        super().__init__()
        arch = GATES[dataset]
        self.attentive = attentive
        self.final_relu = ATTENTIVE_TRUNK_RELU[dataset] if attentive else True
        self.features = LiteralConvs(arch, IN_CHANNELS[dataset])
        self.fc1 = nn.Linear(arch.flat, arch.fc1)
        self.fc2 = nn.Linear(arch.fc1, arch.hidden)
        self.out = None if attentive else nn.Linear(arch.hidden, num_experts)

    def forward(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        t = self.fc2(F.relu(self.fc1(self.features(x))))
        if self.final_relu:
            t = F.relu(t)
        if self.out is None:
            return t
        return F.softmax(self.out(t) / temperature, dim=1)


class LiteralAttention(nn.Module):
    """a_e = (W_q h_g) . (W_k h_e) / sqrt(H), softmax over experts; no value projection (docs/paper-notes.md §2)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.w_q = nn.Linear(hidden, hidden, bias=False)
        self.w_k = nn.Linear(hidden, hidden, bias=False)
        self.hidden = hidden

    def forward(self, hidden_experts_BEH: torch.Tensor, hidden_gate_BH: torch.Tensor) -> torch.Tensor:
        q_B1H = self.w_q(hidden_gate_BH).unsqueeze(1)
        k_BEH = self.w_k(hidden_experts_BEH)
        scores_BE = (q_B1H @ k_BEH.transpose(1, 2)).squeeze(1) / self.hidden ** 0.5
        return F.softmax(scores_BE, dim=1)


class LiteralMoE(nn.Module):
    """y_hat = sum_e g_e f_e (docs/paper-notes.md §1.1). forward -> mixture (B, C); .gate_probs and .expert_probs are kept."""

    def __init__(self, dataset: str, num_experts: int, num_classes: int, gate_kind: str, temperature: float = 1.0):
        super().__init__()
        if gate_kind not in ("softmax", "attentive"):
            raise ValueError(f"the literal model has the paper's two gates, not {gate_kind!r}")
        self.experts = nn.ModuleList(LiteralExpert(dataset, num_classes) for _ in range(num_experts))
        self.gate = LiteralGate(dataset, num_experts, attentive=gate_kind == "attentive")
        self.attention = LiteralAttention(EXPERTS[dataset].hidden) if gate_kind == "attentive" else None
        self.temperature = temperature
        self.gate_probs: torch.Tensor | None = None
        self.expert_probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, hiddens = [], []
        for expert in self.experts:
            outputs.append(expert(x))
            hiddens.append(expert.hidden)
        y_BEC = torch.stack(outputs, dim=1)
        if self.attention is not None:
            p_BE = self.attention(torch.stack(hiddens, dim=1), self.gate(x))
        else:
            p_BE = self.gate(x, self.temperature)
        self.gate_probs, self.expert_probs = p_BE, y_BEC
        return (p_BE.unsqueeze(2) * y_BEC).sum(dim=1)


class LiteralSingle(nn.Module):
    """The single-model baseline: one expert network."""

    def __init__(self, dataset: str, num_classes: int):
        super().__init__()
        self.net = LiteralExpert(dataset, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def literal_nll(mixture_BC: torch.Tensor, y_B: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """L_CE = -mean log(y_hat_y + eps) (docs/paper-notes.md §1.1)."""
    return F.nll_loss(torch.log(mixture_BC + eps), y_B)


def literal_importance(p_BE: torch.Tensor, weight: float) -> torch.Tensor:
    """w * (std_e Imp / mean_e Imp)^2, Imp_e = sum_n g_e(x_n), unbiased std (docs/paper-notes.md §3.2)."""
    imp_E = p_BE.sum(dim=0)
    return weight * (imp_E.std() / imp_E.mean()) ** 2


def literal_sample_similarity(x: torch.Tensor, p_BE: torch.Tensor, beta_s: float, beta_d: float) -> torch.Tensor:
    """beta_s * S - beta_d * D / N^2 with the double loop over experts exactly as the notes give it (docs/paper-notes.md §3.1)."""
    n, e = p_BE.shape
    flat = x.reshape(n, -1)
    dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    dist = dist / dist.max()
    same = torch.zeros(n, n, device=x.device)
    diff = torch.zeros(n, n, device=x.device)
    for i in range(e):
        for j in range(e):
            term = p_BE[:, i].view(-1, 1) * p_BE[:, j].view(1, -1) * dist
            if i == j:
                same = same + term / e
            else:
                diff = diff + term / (e * e - e)
    return beta_s * same.sum() - beta_d * diff.sum() / n ** 2
