"""Copy weights between a literal model (literal.py) and raymoe's model, so both start from the same point,
and read the literal model's gradients under raymoe's parameter names.

The one difference in parameters is deliberate and exact: a conv followed by BatchNorm has no bias in raymoe.
In training mode BatchNorm subtracts the batch mean, so such a bias cancels in the output and gets a zero
gradient (docs/paper-notes.md §7); it is not copied (raymoe -> literal sets it to zero).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from raymoe.fidelity.literal import LiteralConvs, LiteralMoE, LiteralSingle

# (raymoe name, literal tensor, expert index into raymoe's stacked tensor or None)
Pair = tuple[str, torch.Tensor, int | None]
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _conv_pairs(prefix: str, src: LiteralConvs, expert: int | None) -> Iterator[Pair]:
    for i, (conv, bn) in enumerate(zip(src.convs, src.bns)):
        yield f"{prefix}convs.{i}.weight", conv.weight, expert
        if isinstance(bn, nn.BatchNorm2d):
            for name in BN_TENSORS:
                yield f"{prefix}bns.{i}.{name}", getattr(bn, name), expert
        else:
            yield f"{prefix}convs.{i}.bias", conv.bias, expert


def _linear_pairs(prefix: str, layer: nn.Linear, expert: int | None) -> Iterator[Pair]:
    yield f"{prefix}.weight", layer.weight, expert
    if layer.bias is not None:
        yield f"{prefix}.bias", layer.bias, expert


def pairs(literal: nn.Module) -> Iterator[Pair]:
    """Every literal tensor (parameters and BatchNorm statistics) with its place in raymoe's model."""
    if isinstance(literal, LiteralSingle):
        yield from _conv_pairs("net.", literal.net.features, None)
        for name in ("fc1", "fc2", "out"):
            yield from _linear_pairs(f"net.{name}", getattr(literal.net, name), None)
        return
    if not isinstance(literal, LiteralMoE):
        raise TypeError(f"expected a LiteralMoE or LiteralSingle, got {type(literal).__name__}")
    for e, expert in enumerate(literal.experts):
        yield from _conv_pairs("experts.", expert.features, e)
        for name in ("fc1", "fc2", "out"):
            yield from _linear_pairs(f"experts.{name}", getattr(expert, name), e)
    yield from _conv_pairs("gate.trunk.", literal.gate.features, None)
    yield from _linear_pairs("gate.trunk.fc1", literal.gate.fc1, None)
    yield from _linear_pairs("gate.trunk.fc2", literal.gate.fc2, None)
    if literal.attention is not None:
        yield from _linear_pairs("gate.router.w_q", literal.attention.w_q, None)
        yield from _linear_pairs("gate.router.w_k", literal.attention.w_k, None)
    else:
        yield from _linear_pairs("gate.router.proj", literal.gate.out, None)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@torch.no_grad()
def load_literal_into(model: nn.Module, literal: nn.Module) -> nn.Module:
    """Overwrite raymoe `model`'s weights (ExpectationMoE with a softmax or attentive gate, or SingleModel) with
    `literal`'s; returns `model`."""
    mine = _tensors(model)
    for name, value, expert in pairs(literal):
        (mine[name] if expert is None else mine[name][expert]).copy_(value)
    return model


@torch.no_grad()
def load_raymoe_into(literal: nn.Module, model: nn.Module) -> nn.Module:
    """The other way: `literal` gets raymoe `model`'s weights (biases before BatchNorm set to 0); returns it."""
    mine = _tensors(model)
    for name, value, expert in pairs(literal):
        value.copy_(mine[name] if expert is None else mine[name][expert])
    for module in literal.modules():
        if isinstance(module, LiteralConvs):
            for conv, bn in zip(module.convs, module.bns):
                if isinstance(bn, nn.BatchNorm2d):
                    conv.bias.zero_()
    return literal


def literal_grads(literal: nn.Module) -> dict[str, torch.Tensor | None]:
    """The literal model's gradients under raymoe's parameter names, per-expert gradients stacked as raymoe
    stacks its experts (so the two models' gradients compare name by name)."""
    grads: dict[str, list] = {}
    for name, value, expert in pairs(literal):
        if isinstance(value, nn.Parameter):
            grads.setdefault(name, []).append(value.grad)
    out: dict[str, torch.Tensor | None] = {}
    for name, values in grads.items():
        if any(v is None for v in values):
            out[name] = None
        else:
            out[name] = torch.stack(values) if name.startswith("experts.") else values[0]
    return out
