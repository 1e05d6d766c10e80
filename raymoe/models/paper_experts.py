"""The paper's expert networks (docs/paper-notes.md §1.2 table), all experts stacked so one call runs them together.

Every expert is conv stages (3x3 conv, optional BatchNorm, ReLU, 2x2 max-pool) -> fc1 -> ReLU -> fc2 (the
"hidden" layer, kept pre-ReLU for the attentive gate's keys, docs/paper-notes.md §2) -> ReLU -> out -> softmax.

Stacked layout (what makes E experts cost about one call): every parameter and BatchNorm buffer has the
leading local-expert dim (ExpertStack contract). With equal rows per expert (dense gates: every expert sees
the same batch) the convolutions run as ONE grouped conv over channels [expert, channel] and the FC layers
as ONE batched matmul over experts; per-expert BatchNorm is BatchNorm over the E*C stacked channels.
Unequal groups (sparse gates) loop over local experts on contiguous row slices with the same parameters.

Shape legend: E local experts, R rows grouped by local expert, n rows per expert (equal groups), Z channels,
S image side, I fc1 in-features, O/I out/in features, C classes, H hidden width (= attention H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.moe.expert_stack import ExpertStack


@dataclass(frozen=True)
class ConvNetSpec:
    """A conv trunk + two FC layers, as both the paper's experts and its gate networks are built."""

    in_channels: int
    image_size: int
    channels: tuple[int, ...]  # output channels of each 3x3 conv stage (each followed by 2x2 max-pool)
    batchnorm: tuple[bool, ...]  # BatchNorm after that conv (its conv then has no bias, as in the reference)
    padding: int  # 0 for the 28x28 nets (26 -> 13), 1 for the 32x32 CIFAR nets
    fc1: int
    hidden: int  # fc2 width H

    @property
    def flat_features(self) -> int:
        side = self.image_size
        for _ in self.channels:
            side = (side + 2 * self.padding - 2) // 2
        if side < 1:
            raise ValueError(f"image size {self.image_size} is too small for {len(self.channels)} conv stages")
        return self.channels[-1] * side * side


# Expert columns of the docs/paper-notes.md §1.2 architecture table: (conv channels, BatchNorm flags, padding, fc1, H).
EXPERT_ARCHS = {
    "mnist": ((1,), (False,), 0, 5, 32),
    "fashion_mnist": ((1,), (False,), 0, 64, 32),
    "cifar10": ((3, 6, 12, 12), (False, True, False, True), 1, 64, 32),
    "cifar100": ((8, 16, 32, 64), (False, True, False, True), 1, 128, 64),
}


def expert_spec(dataset: str, in_channels: int, image_size: int, hidden: int | None = None) -> ConvNetSpec:
    """The paper's expert network for `dataset`; `hidden` overrides H (cfg.model.hidden_size)."""
    if dataset not in EXPERT_ARCHS:
        raise ValueError(f"no paper expert architecture for data set {dataset!r}; known: {sorted(EXPERT_ARCHS)}")
    channels, bn, padding, fc1, h = EXPERT_ARCHS[dataset]
    return ConvNetSpec(in_channels, image_size, channels, bn, padding, fc1, hidden or h)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """NHWC memory for a 4-d activation: BatchNorm and max-pool run several times faster on CPU in it. Needed
    explicitly after a conv from ONE input channel: such inputs are NCHW and NHWC at once, and conv keeps NCHW."""
    return t.contiguous(memory_format=torch.channels_last)


def _uniform_fan_in(t: torch.Tensor, fan_in: int) -> None:
    """nn.Linear/nn.Conv2d default init: kaiming_uniform(a=sqrt(5)) is U(+-1/sqrt(fan_in)), bias the same."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(t, -bound, bound)


class StackedConv2d(nn.Module):
    """E 3x3 convs: weight (E, O, I, 3, 3), bias (E, O)."""

    def __init__(self, num_experts: int, cin: int, cout: int, padding: int, bias: bool):
        super().__init__()
        self.cin, self.cout, self.padding = cin, cout, padding
        self.weight = nn.Parameter(torch.empty(num_experts, cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.empty(num_experts, cout)) if bias else None
        _uniform_fan_in(self.weight, cin * 9)
        if self.bias is not None:
            _uniform_fan_in(self.bias, cin * 9)

    def forward_all(self, x_nXSS: torch.Tensor) -> torch.Tensor:
        """x (n, E*I, S, S) -> (n, E*O, S', S'): one grouped conv, group e = expert e."""
        e = self.weight.shape[0]
        bias = None if self.bias is None else self.bias.reshape(-1)
        return F.conv2d(x_nXSS, self.weight.reshape(e * self.cout, self.cin, 3, 3), bias, padding=self.padding,
                        groups=e)

    def forward_shared(self, x_GZSS: torch.Tensor) -> torch.Tensor:
        """Every expert's conv on the SAME images, (G, I, S, S) -> (G, E*O, S', S'): the grouped conv over E copies
        of the input equals one ordinary conv with the E experts' filters stacked, so the input is not copied."""
        e = self.weight.shape[0]
        bias = None if self.bias is None else self.bias.reshape(-1)
        weight = self.weight.reshape(e * self.cout, self.cin, 3, 3)
        return F.conv2d(channels_last(x_GZSS), weight, bias, padding=self.padding)  # oneDNN answers in NHWC

    def forward_one(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return F.conv2d(x, self.weight[i], None if self.bias is None else self.bias[i], padding=self.padding)


class StackedBatchNorm2d(nn.Module):
    """E BatchNorm2d(C): weight/bias/running stats (E, C); momentum 0.1, eps 1e-5 like nn.BatchNorm2d."""

    def __init__(self, num_experts: int, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_experts, channels))
        self.bias = nn.Parameter(torch.zeros(num_experts, channels))
        self.register_buffer("running_mean", torch.zeros(num_experts, channels))
        self.register_buffer("running_var", torch.ones(num_experts, channels))

    def forward_all(self, x_nXSS: torch.Tensor) -> torch.Tensor:
        # per-expert BN == BN over the E*C stacked channels; .view keeps the buffers updated in place
        return F.batch_norm(x_nXSS, self.running_mean.view(-1), self.running_var.view(-1), self.weight.reshape(-1),
                            self.bias.reshape(-1), self.training, self.momentum, self.eps)

    def forward_one(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean[i], self.running_var[i], self.weight[i], self.bias[i],
                            self.training, self.momentum, self.eps)


class StackedLinear(nn.Module):
    """E linear layers: weight (E, O, I) as nn.Linear stores it, bias (E, O)."""

    def __init__(self, num_experts: int, fan_in: int, fan_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, fan_out, fan_in))
        self.bias = nn.Parameter(torch.empty(num_experts, fan_out))
        _uniform_fan_in(self.weight, fan_in)
        _uniform_fan_in(self.bias, fan_in)

    def forward_all(self, x_EnI: torch.Tensor) -> torch.Tensor:
        """(E, n, I) -> (E, n, O) in one batched matmul."""
        return torch.baddbmm(self.bias.unsqueeze(1), x_EnI, self.weight.transpose(1, 2))

    def forward_one(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return F.linear(x, self.weight[i], self.bias[i])


class PaperExperts(ExpertStack):
    """All experts of the paper MoE; forward_grouped returns concat([class probs_C, hidden_H]) per row."""

    def __init__(self, num_experts: int, spec: ConvNetSpec, num_classes: int):
        super().__init__(num_experts)
        self.spec, self.num_classes, self.hidden_size = spec, num_classes, spec.hidden
        cins = (spec.in_channels, *spec.channels[:-1])
        self.convs = nn.ModuleList(StackedConv2d(num_experts, cin, cout, spec.padding, bias=not bn)
                                   for cin, cout, bn in zip(cins, spec.channels, spec.batchnorm))
        self.bns = nn.ModuleList(StackedBatchNorm2d(num_experts, c) if bn else nn.Identity()
                                 for c, bn in zip(spec.channels, spec.batchnorm))
        self.fc1 = StackedLinear(num_experts, spec.flat_features, spec.fc1)
        self.fc2 = StackedLinear(num_experts, spec.fc1, spec.hidden)
        self.out = StackedLinear(num_experts, spec.hidden, num_classes)

    @property
    def out_features(self) -> int:
        return self.num_classes + self.hidden_size

    def forward_grouped(self, x_RX: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run local expert i on the i-th contiguous group of counts[i] image rows.

        Args:
            x_RX: (R, C, S, S) images grouped by local expert.
            counts: rows per local expert, len == num_local.
        Returns:
            y (R, K + H): softmax class probabilities, then the pre-ReLU fc2 output.
        """
        if len(counts) != self.num_local:
            raise ValueError(f"got {len(counts)} groups for {self.num_local} local experts")
        if len(set(counts)) == 1:
            return self._forward_equal(x_RX, counts[0])
        outs = [self._forward_one(x, i) for i, x in enumerate(x_RX.split(counts)) if counts[i] > 0]
        if not outs:
            return x_RX.new_zeros((0, self.out_features))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _forward_equal(self, x_RX: torch.Tensor, n: int) -> torch.Tensor:
        e = self.num_local
        if n == 0:
            return x_RX.new_zeros((0, self.out_features))
        c, s = x_RX.shape[1], x_RX.shape[-1]
        # (E*n, C, S, S) -> (n, E*C, S, S) in channels-last memory (one copy): experts become the channel groups
        # of one grouped conv; channels-last makes the tiny grouped convs and the pooling several times faster
        t = x_RX.reshape(e, n, c, s, s).permute(1, 3, 4, 0, 2).contiguous().view(n, s, s, e * c).permute(0, 3, 1, 2)
        return self._stacked_stages(self.convs[0].forward_all(t), n).view(e * n, -1)

    def forward_dense(self, x_GX: torch.Tensor) -> torch.Tensor:
        """Every local expert on the same images -> (e, G, K + H), without replicating them (forward_shared)."""
        n = x_GX.shape[0]
        if n == 0:
            return x_GX.new_zeros((self.num_local, 0, self.out_features))
        return self._stacked_stages(self.convs[0].forward_shared(x_GX), n)

    def _stacked_stages(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """From the first conv's output (n, e*C, S', S') to (e, n, K + H): experts are channel groups."""
        e = self.num_local
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            t = channels_last(t if i == 0 else conv.forward_all(t))
            if isinstance(bn, StackedBatchNorm2d):
                t = bn.forward_all(t)
            t = F.relu(F.max_pool2d(t, 2))  # == pool(relu(t)) (both monotone), on 4x fewer values
        t_EnI = t.reshape(n, e, -1).transpose(0, 1)  # per expert, channel-major flatten as in the reference
        t_EnI = F.relu(self.fc1.forward_all(t_EnI))
        hidden_EnH = self.fc2.forward_all(t_EnI)
        probs_EnC = torch.softmax(self.out.forward_all(F.relu(hidden_EnH)), dim=-1)
        return torch.cat([probs_EnC, hidden_EnH], dim=-1)

    def _forward_one(self, x: torch.Tensor, i: int) -> torch.Tensor:
        t = x
        for conv, bn in zip(self.convs, self.bns):
            t = conv.forward_one(t, i)
            if isinstance(bn, StackedBatchNorm2d):
                t = bn.forward_one(t, i)
            t = F.relu(F.max_pool2d(t, 2))
        t = F.relu(self.fc1.forward_one(t.flatten(1), i))
        hidden = self.fc2.forward_one(t, i)
        probs = torch.softmax(self.out.forward_one(F.relu(hidden), i), dim=-1)
        return torch.cat([probs, hidden], dim=-1)


def conv_stages(spec: ConvNetSpec) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The conv stages of one paper network from ordinary layers: (convs, bns), nn.Identity where no BatchNorm."""
    cins = (spec.in_channels, *spec.channels[:-1])
    convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=spec.padding, bias=not bn)
                          for cin, cout, bn in zip(cins, spec.channels, spec.batchnorm))
    bns = nn.ModuleList(nn.BatchNorm2d(c) if bn else nn.Identity() for c, bn in zip(spec.channels, spec.batchnorm))
    return convs, bns


def run_conv_stages(convs: nn.ModuleList, bns: nn.ModuleList, x_BZSS: torch.Tensor) -> torch.Tensor:
    """conv -> BatchNorm -> max-pool -> ReLU per stage (== ReLU before the pool: both monotone, 4x fewer values),
    in channels-last memory throughout (BatchNorm and pooling run several times faster in it on CPU)."""
    t = x_BZSS
    for conv, bn in zip(convs, bns):
        t = bn(channels_last(conv(channels_last(t))))
        t = F.relu(F.max_pool2d(t, 2))
    return t


class PlainExpert(nn.Module):
    """One expert network from ordinary layers (the single-model baseline). forward -> class probabilities."""

    def __init__(self, spec: ConvNetSpec, num_classes: int):
        super().__init__()
        self.convs, self.bns = conv_stages(spec)
        self.fc1 = nn.Linear(spec.flat_features, spec.fc1)
        self.fc2 = nn.Linear(spec.fc1, spec.hidden)
        self.out = nn.Linear(spec.hidden, num_classes)

    def forward(self, x_BZSS: torch.Tensor) -> torch.Tensor:
        t = F.relu(self.fc1(run_conv_stages(self.convs, self.bns, x_BZSS).flatten(1)))
        return torch.softmax(self.out(F.relu(self.fc2(t))), dim=-1)
