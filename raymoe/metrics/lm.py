"""Language-model evaluation metrics, accumulated as sums so ranks add up exactly (like accumulator.py).

Per evaluation: loss (mean NLL per token, nats), perplexity, bits per byte (NLL in bits per UTF-8 byte of the
evaluated text, whatever the tokenizer: bits/token divided by the split's bytes per token), next-token error.
Per MoE layer i, "layer{i}/...": usage_entropy_bits (H_u of the mean gate), sample_entropy_bits (per token),
dropped_frac, load share per expert (routed pairs, not gate mass), router_z, and the LM counterparts of the
paper's I(E;Y) (docs/paper-notes.md §4.2) with E = each token's top-1 expert: mi_current_token_bits (the token at
that position), mi_next_token_bits (the token it must predict), mi_position_bits (position bucket of
POSITION_BUCKETS equal slices of the context). Top-level keys are means over layers.
Shape legend: B sequences, T positions, N = B*T routed tokens, E experts, V vocabulary, t position buckets.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from raymoe.metrics.specialization import entropy_bits, mutual_information_bits
from raymoe.metrics.stability import FirstItems
from raymoe.models.output import ModelOutput
from raymoe.parallel.context import DistContext

POSITION_BUCKETS = 8
LAYER_KEYS = ("usage_entropy_bits", "sample_entropy_bits", "mi_current_token_bits", "mi_next_token_bits",
              "mi_position_bits", "router_z")


class _LayerSums:
    def __init__(self, num_experts: int, vocab: int, device: torch.device, keep_items: int = 0):
        f64 = dict(dtype=torch.float64, device=device)
        self.first = FirstItems(keep_items)  # top-1 expert of this rank's first keep_items tokens (stability)
        self.scalars = torch.zeros(5, **f64)  # tokens, entropy sum, z^2 sum, dropped sum, tokens with a dropped stat
        self.probs_E = torch.zeros(num_experts, **f64)
        self.load_E = torch.zeros(num_experts, **f64)
        self.cur_EV = torch.zeros(num_experts, vocab, **f64)
        self.next_EV = torch.zeros(num_experts, vocab, **f64)
        self.pos_Et = torch.zeros(num_experts, POSITION_BUCKETS, **f64)

    def tensors(self) -> list[torch.Tensor]:
        return [self.scalars, self.probs_E, self.load_E, self.cur_EV, self.next_EV, self.pos_Et]

    def update(self, gate, stats: dict | None, cur_N: torch.Tensor, next_N: torch.Tensor, pos_N: torch.Tensor):
        e, v = self.cur_EV.shape
        probs_NE = gate.probs_NE.detach()
        n = probs_NE.shape[0]
        top1_N = gate.top1_N
        dropped, has = 0.0, 0.0
        if stats and "dropped_frac" in stats:
            dropped, has = float(stats["dropped_frac"]) * n, float(n)
        lse_N = torch.logsumexp(gate.logits_NE.detach().double(), dim=-1)
        self.scalars += torch.tensor([n, float(entropy_bits(probs_NE, dim=-1).sum()), float(lse_N.pow(2).sum()),
                                      dropped, has], dtype=torch.float64, device=self.scalars.device)
        self.probs_E += probs_NE.double().sum(0)
        kept = gate.experts_NK[gate.experts_NK >= 0]
        self.load_E += torch.bincount(kept, minlength=e).double()
        self.cur_EV += torch.bincount(top1_N * v + cur_N, minlength=e * v).view(e, v).double()
        self.next_EV += torch.bincount(top1_N * v + next_N, minlength=e * v).view(e, v).double()
        p = POSITION_BUCKETS
        self.pos_Et += torch.bincount(top1_N * p + pos_N, minlength=e * p).view(e, p).double()
        self.first.keep(top1_N)

    def metrics(self) -> dict[str, float]:
        tokens, ent, z, dropped, has = self.scalars.tolist()
        load = self.load_E.cpu()
        out = {"usage_entropy_bits": float(entropy_bits(self.probs_E.cpu() / max(tokens, 1.0))),
               "sample_entropy_bits": ent / tokens if tokens else math.nan,
               "router_z": z / tokens if tokens else math.nan,
               "mi_current_token_bits": mutual_information_bits(self.cur_EV.cpu()),
               "mi_next_token_bits": mutual_information_bits(self.next_EV.cpu()),
               "mi_position_bits": mutual_information_bits(self.pos_Et.cpu())}
        if has:
            out["dropped_frac"] = dropped / has
        if load.sum() > 0:
            share = load / load.sum()
            out.update({f"load_share/{i}": float(s) for i, s in enumerate(share)})
            out["max_load_share"] = float(share.max())
        return out


class LanguageModelAccumulator:
    """Sums over evaluation batches of a language model: NLL, next-token accuracy, and per-layer routing."""

    def __init__(self, vocab_size: int, block_size: int, keep_items: int = 0):
        self.vocab, self.block, self.keep_items = vocab_size, block_size, keep_items
        self.scalars: torch.Tensor | None = None  # nll sum, correct, tokens
        self.layers: list[_LayerSums] = []

    @torch.no_grad()
    def update(self, out: ModelOutput, idx_BT: torch.Tensor, targets_BT: torch.Tensor) -> None:
        log_probs_NV = out.log_probs_BC.detach().float()
        device = log_probs_NV.device
        if self.scalars is None:
            self.scalars = torch.zeros(3, dtype=torch.float64, device=device)
            self.layers = [_LayerSums(g.num_experts, self.vocab, device, self.keep_items) for g in out.gates]
        next_N = targets_BT.reshape(-1)
        nll = torch.nn.functional.nll_loss(log_probs_NV, next_N, reduction="sum")
        correct = (log_probs_NV.argmax(-1) == next_N).sum()
        self.scalars += torch.stack([nll.double(), correct.double(),
                                     torch.tensor(float(next_N.numel()), dtype=torch.float64, device=device)])
        b, t = idx_BT.shape
        pos_N = (torch.arange(t, device=device) * POSITION_BUCKETS // self.block).clamp(max=POSITION_BUCKETS - 1)
        pos_N = pos_N.repeat(b)
        for i, (sums, gate) in enumerate(zip(self.layers, out.gates)):
            sums.update(gate, out.layer_stats[i] if i < len(out.layer_stats) else None, idx_BT.reshape(-1), next_N,
                        pos_N)

    def reduce(self, ctx: DistContext) -> None:
        """Sum over ranks (every rank evaluates a shard of the same fixed windows)."""
        if not ctx.distributed or self.scalars is None:
            return
        for t in [self.scalars, *(t for layer in self.layers for t in layer.tensors())]:
            ctx.all_reduce_sum(t)

    def compute(self, bytes_per_token: float) -> dict[str, float]:
        if self.scalars is None:
            return {}
        nll, correct, tokens = self.scalars.tolist()
        loss = nll / tokens
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "error": 1.0 - correct / tokens,
               "bits_per_byte": loss / math.log(2.0) / bytes_per_token}
        per_layer = [layer.metrics() for layer in self.layers]
        for i, metrics in enumerate(per_layer):
            out.update({f"layer{i}/{k}": v for k, v in metrics.items()})
        for key in LAYER_KEYS:
            values = [m[key] for m in per_layer if key in m]
            if values:
                out[key] = float(np.mean(values))
        if per_layer:
            out["dead_expert_frac"] = float(np.mean([
                np.mean([m.get(f"load_share/{e}", 0.0) < 1.0 / (10 * len(layer.load_E))
                         for e in range(len(layer.load_E))]) for m, layer in zip(per_layer, self.layers)]))
        return out

    def first_top1(self) -> list[np.ndarray]:
        """Per layer: the top-1 expert of this rank's first keep_items evaluation tokens (routing stability)."""
        return [layer.first.array() for layer in self.layers]

    def matrices(self, top_tokens: int = 32) -> dict[str, np.ndarray]:
        """Per layer: expert x most frequent current tokens (counts) and the token ids, for the heatmaps."""
        out: dict[str, np.ndarray] = {}
        for i, layer in enumerate(self.layers):
            cur = layer.cur_EV.cpu()
            order = cur.sum(0).argsort(descending=True)[:top_tokens]
            out[f"layer{i}/counts_token_EV"] = cur[:, order].numpy().astype(np.int64)
            out[f"layer{i}/token_ids"] = order.numpy()
            out[f"layer{i}/load_E"] = layer.load_E.cpu().numpy().astype(np.int64)
        return out
