"""`raymoe bench moe-layer`: forward+backward time of the token MoE layer vs a dense FFN and a naive MoE.

For each size and k in (1, 2), with one set of random inputs and weights, it times (median over --iters after
--warmup, variants interleaved round-robin so machine-load drift hits all of them alike):
  * layer:         TokenMoE (dropless top-k, sort-based dispatch, grouped GEMM experts);
  * dense_chunked: a dense GELU FFN with the same active FLOPs (hidden k * d_ff) run over the tokens in E equal
                   chunks, i.e. what the experts' GEMMs would cost with perfectly even groups;
  * naive:         the same router and experts as a per-expert loop: mask, gather, FFN, weight, index_add;
  * experts_only:  the layer's experts alone on T * k rows already sorted into E equal groups (their own leaf
                   tensor: no router, dispatch, combine or copy is timed): separates what routing costs
                   (layer / experts_only) from what E distinct weight matrices cost over one shared one
                   (experts_only / dense_chunked, memory traffic on CPU);
  * router_only:   the layer's router alone (logits, softmax, top-k, combine weights; backward from the weights):
                   experts_only + router_only is what the layer would cost if dispatch and combine were free;
  * routing_only:  the layer with identity experts (router, sort, dispatch, combine, combine weights): the
                   layer's other half, so experts_only + routing_only is the layer timed in two parts;
  * hypermoe:      the layer plus HyperMoE (code-default sizes: embeddings/hypernetwork 128, adapter
                   --adapter-dim, default 64); at top-1 it runs on the experts' dispatched rows;
  * hypermoe_own_gather (top-1 only): the same HyperMoE layer gathering the tokens by set itself, as under expert
                   parallelism: what running on the dispatched rows saves (TokenMoE._hypermoe_in_dispatched_rows).
Prints one JSON line per (size, k) with ratio_vs_dense = layer / dense_chunked, ratio_vs_naive = layer / naive,
floor_vs_dense, parts_vs_dense and hypermoe_overhead = hypermoe / layer - 1 (and at top-1
hypermoe_own_gather_overhead), from wall-clock medians; on CPU the same ratios from process CPU-time medians too
("cpu_time"), which other jobs on a shared machine disturb far less (exact for --threads 1).
float32; threads = torch.get_num_threads() unless --threads; subnormals flushed and freed memory kept, as in training.

Shape legend: N tokens, D model dim, F expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.kernels.fast_paths import apply_fast_paths, gemm_choice
from raymoe.moe.token.hypermoe import HyperMoE, HyperNetwork
from raymoe.moe.token.layer import TokenMoE
from raymoe.moe.routers import LinearRouter
from raymoe.moe.token.shared import FeedForward

FULL_SIZES = [(8192, 256, 1024, 8), (4096, 512, 2048, 16)]  # (T, d, d_ff, E)
QUICK_SIZES = [(512, 64, 128, 8)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes, few iterations (smoke test)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per variant (default 12; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--impl", choices=["auto", "grouped_mm", "loop"], default="auto",
                        help="expert GEMM path of the layer")
    parser.add_argument("--no-hypermoe", action="store_true", help="skip the HyperMoE overhead measurement")
    parser.add_argument("--adapter-dim", type=int, default=64,
                        help="HyperExpert bottleneck b (Hyper_MoE code default 64, there with d = 768, d_ff = 3072)")


def _naive_moe(layer: TokenMoE, x_ND: torch.Tensor) -> torch.Tensor:
    """Reference implementation: one masked pass per expert, scattered back with index_add."""
    gate = layer.router(x_ND)
    ex = layer.experts
    y_ND = torch.zeros_like(x_ND)
    for e in range(layer.num_experts):
        hit_NK = gate.experts_NK == e
        tok = hit_NK.any(dim=1).nonzero().squeeze(1)
        w = (gate.weights_NK * hit_NK).sum(dim=1)[tok].unsqueeze(1)
        x_e = x_ND[tok]
        h = F.gelu(torch.addmm(ex.b1_EF[e], x_e, ex.w1_EDF[e]))
        y_ND.index_add_(0, tok, w * torch.addmm(ex.b2_ED[e], h, ex.w2_EFD[e]))
    return y_ND


class _IdentityExperts(nn.Module):
    """Experts that return their rows: a TokenMoE holding them times routing alone (routing_only)."""

    def forward_grouped(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return x_RD


def _dense_chunked(ffn: FeedForward, x_ND: torch.Tensor, chunks: int) -> torch.Tensor:
    return torch.cat([ffn(x) for x in x_ND.chunk(chunks)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_variants(fns: dict, params: dict, x: torch.Tensor, grads: dict, iters: int, warmup: int,
                   device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU milliseconds of every timed forward+backward, variants interleaved; variant
    `name`'s output gets the gradient grads[name] (default grads["*"])."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            for p in params[name]:
                p.grad = None
            x.grad = None
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(x)
            out.backward(grads.get(name, grads["*"]))
            _sync(device)
            if i >= warmup:
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    return wall, cpu


def bench_size(n: int, d: int, d_ff: int, e: int, k: int, iters: int, warmup: int, device: torch.device,
               impl: str, hypermoe: bool, adapter_dim: int = 64) -> dict:
    torch.manual_seed(0)
    layer = TokenMoE(d, d_ff, e, LinearRouter(d, e, top_k=k), capacity_factor=None, impl=impl).to(device)
    dense = FeedForward(d, k * d_ff).to(device)
    # the layer as train_fn runs it (its router's nn.Linear gets the probe's backend, raymoe/kernels/fast_paths.py);
    # the dense FFN keeps torch's GEMM, as the experts' stacked weights do: the ratio compares like with like
    apply_fast_paths(layer, device)
    even = [n * k // e] * e
    sorted_rows = torch.randn(n * k, d, device=device, requires_grad=True)  # experts_only's input, pre-sorted
    routing = TokenMoE(d, 1, e, layer.router, capacity_factor=None).to(device)  # d_ff 1: its experts are replaced
    routing.experts = _IdentityExperts()
    fns = {"layer": lambda x: layer(x)[0], "dense_chunked": lambda x: _dense_chunked(dense, x, e),
           "naive": lambda x: _naive_moe(layer, x),
           "experts_only": lambda _: layer.experts.forward_grouped(sorted_rows, even),
           "router_only": lambda x: layer.router(x).weights_NK,
           "routing_only": lambda x: routing(x)[0]}
    params = {"layer": list(layer.parameters()), "dense_chunked": list(dense.parameters()),
              "naive": list(layer.parameters()), "experts_only": [*layer.experts.parameters(), sorted_rows],
              "router_only": list(layer.router.parameters()), "routing_only": list(layer.router.parameters())}
    if hypermoe:
        hypernet = HyperNetwork(num_layers=1, dim=d, adapter_dim=adapter_dim).to(device)
        hyper_layer = TokenMoE(d, d_ff, e, layer.router, capacity_factor=None, impl=impl,
                               hypermoe=HyperMoE(e, hypernet).to(device)).to(device)
        hyper_layer.experts.load_state_dict(layer.experts.state_dict())
        apply_fast_paths(hyper_layer, device)
        apply_fast_paths(hypernet, device)
        fns["hypermoe"] = lambda x: hyper_layer(x)[0]
        params["hypermoe"] = list(hyper_layer.parameters()) + list(hypernet.parameters())
        if k == 1:
            own_gather = TokenMoE(d, d_ff, e, layer.router, capacity_factor=None, impl=impl,
                                  hypermoe=hyper_layer.hypermoe).to(device)
            own_gather.experts = hyper_layer.experts
            own_gather.dispatcher.local_rows = False  # this instance takes the expert-parallel path
            fns["hypermoe_own_gather"] = lambda x: own_gather(x)[0]
            params["hypermoe_own_gather"] = params["hypermoe"]
    x = torch.randn(n, d, device=device, requires_grad=True)
    grads = {"*": torch.randn(n, d, device=device), "router_only": torch.randn(n, k, device=device),
             "experts_only": torch.randn(n * k, d, device=device)}
    with torch.no_grad():
        y_ND, gate, stats = layer(x)
        load = stats["load_E"]
        # what is timed computes the same function: the layer against one masked pass per expert, and routing
        # alone against sum_k w_k * x (identity experts)
        naive_gap = float((y_ND - _naive_moe(layer, x)).abs().max())
        routing_gap = float((routing(x)[0] - gate.weights_NK.sum(1, keepdim=True) * x).abs().max())
        paths_gap = (float((fns["hypermoe"](x) - fns["hypermoe_own_gather"](x)).abs().max())
                     if "hypermoe_own_gather" in fns else None)
    wall, cpu = _time_variants(fns, params, x, grads, iters, warmup, device)
    ms = {name: statistics.median(v) for name, v in wall.items()}
    row = {"bench": "moe_layer", "T": n, "d": d, "d_ff": d_ff, "E": e, "top_k": k,
           "layer_ms": round(ms["layer"], 2), "dense_chunked_ms": round(ms["dense_chunked"], 2),
           "naive_ms": round(ms["naive"], 2), "ratio_vs_dense": round(ms["layer"] / ms["dense_chunked"], 3),
           "ratio_vs_naive": round(ms["layer"] / ms["naive"], 3),
           "experts_only_ms": round(ms["experts_only"], 2),
           "ratio_vs_experts_only": round(ms["layer"] / ms["experts_only"], 3),
           "router_only_ms": round(ms["router_only"], 2),
           # the layer with free dispatch and combine: its experts plus its router, over the dense FFN
           "floor_vs_dense": round((ms["experts_only"] + ms["router_only"]) / ms["dense_chunked"], 3),
           "routing_only_ms": round(ms["routing_only"], 2),
           # the layer timed in two halves (experts; router, sort, dispatch and combine), over the dense FFN
           "parts_vs_dense": round((ms["experts_only"] + ms["routing_only"]) / ms["dense_chunked"], 3),
           "max_load_over_mean": round(float(load.max() / load.mean()), 2), "max_abs_diff_vs_naive": naive_gap,
           "max_abs_diff_routing_only": routing_gap}
    if hypermoe:
        row["adapter_dim"] = adapter_dim
        row["hypermoe_ms"] = round(ms["hypermoe"], 2)
        row["hypermoe_overhead"] = round(ms["hypermoe"] / ms["layer"] - 1, 3)
        if paths_gap is not None:
            row["hypermoe_own_gather_overhead"] = round(ms["hypermoe_own_gather"] / ms["layer"] - 1, 3)
            row["max_abs_diff_hypermoe_paths"] = paths_gap
    if device.type == "cpu":  # CPU time is far less disturbed than wall time by other jobs on a shared machine
        c = {name: statistics.median(v) for name, v in cpu.items()}
        row["cpu_time"] = {"ratio_vs_dense": round(c["layer"] / c["dense_chunked"], 3),
                           "ratio_vs_naive": round(c["layer"] / c["naive"], 3),
                           "ratio_vs_experts_only": round(c["layer"] / c["experts_only"], 3),
                           "experts_only_vs_dense": round(c["experts_only"] / c["dense_chunked"], 3),
                           "floor_vs_dense": round((c["experts_only"] + c["router_only"]) / c["dense_chunked"], 3),
                           "parts_vs_dense": round((c["experts_only"] + c["routing_only"]) / c["dense_chunked"], 3)}
        if hypermoe:
            row["cpu_time"]["hypermoe_overhead"] = round(c["hypermoe"] / c["layer"] - 1, 3)
            if paths_gap is not None:
                row["cpu_time"]["hypermoe_own_gather_overhead"] = round(c["hypermoe_own_gather"] / c["layer"] - 1, 3)
    return row


def run(args: argparse.Namespace) -> int:
    from raymoe.bench.fidelity import cpu_model
    from raymoe.runtime import prepare_cpu_process

    prepare_cpu_process()  # the process settings every training process runs with
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    iters = args.iters or (3 if args.quick else 12)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    print(json.dumps({"bench": "moe_layer", "device": str(device), "cpu": cpu_model(),
                      "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "machine": platform.machine(), "dtype": "float32", "iters": iters, "warmup": warmup,
                      "impl": args.impl, "grouped_mm": hasattr(torch, "_grouped_mm"),
                      "gemm": gemm_choice(device)}), flush=True)
    for n, d, d_ff, e in sizes:
        for k in (1, 2):
            print(json.dumps(bench_size(n, d, d_ff, e, k, iters, warmup, device, args.impl,
                                        hypermoe=not args.no_hypermoe, adapter_dim=args.adapter_dim)), flush=True)
    return 0
