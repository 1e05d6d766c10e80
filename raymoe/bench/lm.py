"""`raymoe bench lm`: training speed of the language models, side by side in one run.

Every variant runs the real training step (raymoe.train.step.train_epoch with the preset's optimizer, clipping and
precision) on synthetic batches of the preset's shape (the model step, not the data pipeline), round-robin over
--repeats rounds so load drift hits all alike; the medians give:
  * moe_over_dense_time: step time of gpt_moe (top-1 and top-2) / the dense gpt with the same active FLOPs
    (arch gpt widens its FFN to top_k * mlp_dim); target <= 1.15, in fp32 and in bf16;
  * bf16_speedup: fp32 time / bf16 time of gpt_moe top-2, of the ViT-MoE and of the paper's FMNIST MoE; on a
    device without bf16 arithmetic the bench says so and skips it;
  * hypermoe_overhead: gpt_moe top-2 + HyperMoE time / gpt_moe top-2 time - 1 (target <= 0.15).
--size gpu times the GPU-size presets (tune_configs/lm/gpu: d 512, 8 layers, 16 experts, BPE vocabulary 8192),
where HyperMoE's hypernetwork and adapters weigh what they weigh at the paper's scale; with --batch-size a CPU
can time a few of its steps. One JSON line per measurement, then a summary line; the CPU model is recorded with
them.
Shape legend: B sequences or images, T positions, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from raymoe.config.load import load_experiment

PRESETS = Path(__file__).resolve().parents[2] / "tune_configs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin rounds; medians compared (default 3)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 1 round (smoke test)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu",
                        help="model size: tune_configs/lm (default) or tune_configs/lm/gpu (language models only)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the preset's)")


def _lm_config(arch: str, top_k: int, hypermoe: bool, args: argparse.Namespace):
    over = [f"model.arch={arch}", f"gate.top_k={top_k}", f"gate.hypermoe.enabled={str(hypermoe).lower()}",
            f"train.device={args.device}", "train.max_steps=1000"]
    if args.quick:
        over += ["model.gpt.dim=32", "model.gpt.depth=2", "model.gpt.heads=2", "model.gpt.mlp_dim=32",
                 "model.gpt.block_size=32", "data.text.block_size=32", "train.batch_size=4"]
    if args.batch_size:
        over.append(f"train.batch_size={args.batch_size}")
    preset = "lm/gpu/gshard_hypermoe.yaml" if args.size == "gpu" else "lm/gshard.yaml"
    return load_experiment(PRESETS / preset, over)


def active_params_per_token(model: torch.nn.Module, top_k: int) -> int:
    """Parameters one token passes through: everything but the experts it is not routed to (top_k of E per MoE
    layer; the embedding table counted whole, as in both models alike)."""
    from raymoe.moe.token.experts import TokenExperts

    total = sum(p.numel() for p in model.parameters())
    for stack in (m for m in model.modules() if isinstance(m, TokenExperts)):
        per_expert = sum(p.numel() for p in stack.parameters()) // stack.num_experts
        total -= per_expert * (stack.num_experts - top_k)
    return total


def router_params(model: torch.nn.Module) -> int:
    """Parameters of the MoE layers' routers: what an MoE adds on top of its dense baseline's active parameters."""
    from raymoe.moe.token.layer import TokenMoE

    return sum(p.numel() for m in model.modules() if isinstance(m, TokenMoE) for p in m.router.parameters())


class Variant:
    """One model with its optimizer and a fixed synthetic batch."""

    def __init__(self, name: str, cfg, model, x, y, precision: str, device: torch.device):
        from raymoe.train.loop import make_optimizer
        from raymoe.train.step import StepSettings

        self.name, self.cfg, self.model, self.x, self.y, self.device = name, cfg, model.to(device), x, y, device
        self.precision = precision
        self.optimizer = make_optimizer(cfg.train, self.model)
        self.settings = StepSettings(precision=precision, grad_clip=cfg.train.grad_clip)
        self.times: list[float] = []

    def run(self, steps: int, timed: bool) -> None:
        from raymoe.parallel.context import DistContext
        from raymoe.train.step import train_epoch

        batch = len(self.y)
        start = time.perf_counter()
        train_epoch(self.model, self.optimizer, [(self.x, self.y)] * steps, reg_cfg=self.cfg.regularizer,
                    ctx=DistContext(device=self.device), epoch=1, num_samples=batch * steps, batch_size=batch,
                    settings=self.settings)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if timed:
            self.times.append((time.perf_counter() - start) / steps)

    @property
    def step_seconds(self) -> float:
        return statistics.median(self.times)


def _variants(args, precision: str, device: torch.device) -> list[Variant]:
    from raymoe.data.text.tokenizers import tokenizer_vocab
    from raymoe.kernels.fast_paths import apply_fast_paths
    from raymoe.models.build import build_model

    out = []
    g = torch.Generator().manual_seed(0)
    for name, arch, k, hyper in (("dense_k1", "gpt", 1, False), ("moe_top1", "gpt_moe", 1, False),
                                 ("dense_k2", "gpt", 2, False), ("moe_top2", "gpt_moe", 2, False),
                                 ("moe_top2_hypermoe", "gpt_moe", 2, True)):
        cfg = _lm_config(arch, k, hyper, args)
        vocab = tokenizer_vocab(cfg.data.text)
        torch.manual_seed(0)
        model = build_model(cfg, vocab, 0, 0)
        apply_fast_paths(model, device)
        b, t = cfg.train.batch_size, cfg.data.text.block_size
        x = torch.randint(vocab, (b, t), generator=g).to(device)
        y = torch.randint(vocab, (b, t), generator=g).to(device)
        out.append(Variant(name, cfg, model, x, y, precision, device))
    if args.quick or args.size == "gpu":  # the image models have one size
        return out
    for name, preset in (("vit_moe", "vit/fmnist_gshard.yaml"), ("paper_fmnist_moe", "paper/fmnist/attentive.yaml")):
        cfg = load_experiment(PRESETS / preset, [f"train.device={args.device}"])
        torch.manual_seed(0)
        model = build_model(cfg, 10, 1, 28)
        apply_fast_paths(model, device)
        b = cfg.train.batch_size
        x = torch.randn(b, 1, 28, 28, generator=g).to(device)
        y = torch.randint(10, (b,), generator=g).to(device)
        out.append(Variant(name, cfg, model, x, y, precision, device))
    return out


def run(args: argparse.Namespace) -> int:
    from raymoe.bench.fidelity import cpu_model
    from raymoe.runtime import bf16_supported, pick_device, prepare_process

    device = pick_device(args.device)
    prepare_process(device)
    precisions = list(args.precisions)
    from raymoe.kernels.fast_paths import gemm_choice

    header = {"bench": "lm", "device": str(device), "cpu": cpu_model(), "threads": torch.get_num_threads(),
              "size": args.size, "gemm": gemm_choice(device)}
    if "bf16" in precisions and not bf16_supported(device):
        precisions.remove("bf16")
        header["bf16"] = f"skipped: {device} has no bf16 arithmetic (AVX512-BF16/AMX on CPU), so no bf16 ratios"
    print(json.dumps(header), flush=True)
    variants = [v for p in precisions for v in _variants(args, p, device)]
    for v in variants:
        v.run(args.warmup, timed=False)
    for _ in range(1 if args.quick else args.repeats):
        for v in variants:
            v.run(args.steps, timed=True)
    by = {(v.name, v.precision): v for v in variants}
    for v in variants:
        targets = v.y.numel()
        print(json.dumps({"bench": "lm", "variant": v.name, "precision": v.precision,
                          "active_params_per_token": active_params_per_token(v.model, v.cfg.gate.top_k),
                          "router_params": router_params(v.model),
                          "step_ms": round(1000 * v.step_seconds, 2),
                          "targets_per_s": round(targets / v.step_seconds, 1)}), flush=True)
    summary = {"bench": "lm", "summary": True, "cpu": header["cpu"], "device": str(device)}
    for p in precisions:
        for k in (1, 2):
            summary[f"moe_over_dense_time_top{k}_{p}"] = round(
                by[(f"moe_top{k}", p)].step_seconds / by[(f"dense_k{k}", p)].step_seconds, 3)
        summary[f"hypermoe_overhead_{p}"] = round(
            by[("moe_top2_hypermoe", p)].step_seconds / by[("moe_top2", p)].step_seconds - 1, 3)
    if "bf16" in precisions and "fp32" in precisions:
        for name in ("moe_top2", "vit_moe", "paper_fmnist_moe"):
            if (name, "bf16") in by:
                summary[f"bf16_speedup_{name}"] = round(by[(name, "fp32")].step_seconds /
                                                        by[(name, "bf16")].step_seconds, 2)
    print(json.dumps(summary), flush=True)
    return 0
