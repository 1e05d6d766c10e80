"""`raymoe bench train`: training throughput of the paper's Fashion-MNIST 5-expert attentive MoE.

Batch 512 on the full 60k training set, through the same `train_epoch` and `evaluate` that `raymoe train` runs
(no MLflow or checkpoint I/O). Prints one JSON line: samples/s including the per-epoch evaluation of the
10k test set, seconds per epoch, and the data pipeline's share of step time.
It then times the literal reference loop (torchvision DataLoader with per-sample transforms, separate expert
modules; raymoe/fidelity/literal_loop.py) on the same machine in the same run and prints the speed-up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from raymoe.config.load import load_experiment

PRESET = Path(__file__).resolve().parents[2] / "tune_configs" / "paper" / "fmnist" / "attentive.yaml"
FALLBACK = {"name": "bench-train", "data": {"name": "fashion_mnist"}, "model": {"num_experts": 5},
            "gate": {"kind": "attentive"}, "train": {"batch_size": 512, "lr": 1e-3}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (default 3)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training images (default all 60k)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set gate.kind=softmax")
    parser.add_argument("--profile", action="store_true", help="also print the torch profiler's top ops")
    parser.add_argument("--literal-steps", type=int, default=24,
                        help="also time this many steps (plus one test-set evaluation) of the literal reference "
                             "loop (raymoe/fidelity/literal_loop.py) in this run and print the speed-up; 0 = skip")


def bench_config(args: argparse.Namespace):
    overrides = [f"data.train_limit={args.train_limit if args.train_limit else 'null'}", "data.test_limit=null",
                 "train.progress=false", *args.overrides]
    if PRESET.is_file():
        return load_experiment(PRESET, overrides)
    return load_experiment(raw=FALLBACK, overrides=overrides)


def run(args: argparse.Namespace) -> int:
    from raymoe.data.batches import eval_batches, train_batches
    from raymoe.data.datasets import load_dataset
    from raymoe.parallel.context import DistContext
    from raymoe.runtime import epoch_seed, pick_device, prepare_process, seed_everything
    from raymoe.train.loop import build_for, make_optimizer
    from raymoe.train.step import evaluate, train_epoch

    cfg = bench_config(args)
    device = pick_device(cfg.train.device)
    threads = prepare_process(device)
    seed_everything(cfg.seed)
    ctx = DistContext(device=device)
    data = load_dataset(cfg.data, device)
    model = build_for(cfg, data, device)
    optimizer = make_optimizer(cfg.train, model)
    num_train, bs = len(data.train.y), cfg.train.batch_size

    def batches(epoch: int):
        return train_batches(data.train, bs, generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)),
                             augment=data.augment, rank=0, world_size=1)

    if args.warmup_steps:
        warm = itertools.islice(batches(0), args.warmup_steps)
        train_epoch(model, optimizer, warm, reg_cfg=cfg.regularizer, ctx=ctx, epoch=0, num_samples=num_train,
                    batch_size=bs)
    load_before = os.getloadavg()[0]
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    epochs = []
    profiler = None
    if args.profile:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profiler.__enter__()
    for epoch in range(1, args.epochs + 1):
        result = train_epoch(model, optimizer, batches(epoch), reg_cfg=cfg.regularizer, ctx=ctx, epoch=epoch,
                             num_samples=num_train, batch_size=bs)
        start = time.perf_counter()
        test, _ = evaluate(model, eval_batches(data.test, cfg.train.eval_batch_size, rank=0, world_size=1), ctx=ctx,
                           num_experts=cfg.model.num_experts, num_classes=data.num_classes, bn_eval=cfg.train.bn_eval)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epochs.append((result, time.perf_counter() - start, test))
    cpu_s, wall_s = time.process_time() - cpu_before, time.perf_counter() - wall_before
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    if profiler is not None:
        profiler.__exit__(None, None, None)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    train_s = [r.seconds for r, _, _ in epochs]
    eval_s = [e for _, e, _ in epochs]
    total_s = [t + e for t, e in zip(train_s, eval_s)]
    samples = epochs[-1][0].samples
    report = {
        "bench": "train",
        "model": f"{cfg.data.name} {cfg.model.arch} {cfg.gate.kind} gate, {cfg.model.num_experts} experts",
        "batch_size": bs,
        "train_samples": samples,
        "test_samples": len(data.test.y),
        "epochs": len(epochs),
        "samples_per_s": round(samples / statistics.mean(total_s), 1),
        "train_only_samples_per_s": round(samples / statistics.mean(train_s), 1),
        "seconds_per_epoch": round(statistics.mean(total_s), 3),
        "train_seconds_per_epoch": round(statistics.mean(train_s), 3),
        "eval_seconds_per_epoch": round(statistics.mean(eval_s), 3),
        "data_fraction": round(sum(r.data_seconds for r, _, _ in epochs) / sum(train_s), 4),
        "final_test_error": round(epochs[-1][2].get("error", float("nan")), 4),
        "device": str(device),
        "threads": threads,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        # On a shared machine: the share of `threads` cores this process actually got, and the throughput
        # that CPU time would give with the cores to itself (conservative: spin-waiting also counts as CPU).
        "cpu_share": round(cpu_s / (wall_s * threads), 3),
        "cpu_time_samples_per_s": round(samples * len(epochs) / (cpu_s / threads), 1),
        # fresh pages touched (a fault costs ~3.5 us in a VM); ~0 once freed memory is kept (keep_freed_memory)
        "page_faults_per_step": round(faults / sum(r.steps for r, _, _ in epochs), 1),
        "data_source": str(getattr(data, "source", "")),
    }
    if args.literal_steps > 0 and cfg.model.arch in ("moe", "single") and cfg.gate.kind in ("softmax", "attentive"):
        literal = literal_samples_per_s(cfg, args.literal_steps, num_train)
        report["literal_loop_samples_per_s"] = round(literal, 1)
        report["speedup_vs_literal_loop"] = round(report["samples_per_s"] / literal, 2)
    from raymoe.bench.fidelity import cpu_model
    from raymoe.kernels.fast_paths import conv_choice, gemm_choice

    report["cpu"] = cpu_model()
    report["gemm"], report["conv"] = gemm_choice(device), conv_choice(device)
    print(json.dumps(report), flush=True)
    return 0


def literal_samples_per_s(cfg, steps: int, num_train: int, warmup: int = 2) -> float:
    """Training samples/s of the literal reference loop INCLUDING one test-set evaluation per epoch: `steps` timed
    steps (after `warmup`) extrapolated to a full epoch of `num_train` samples, plus the measured evaluation."""
    import tempfile

    from raymoe.fidelity.literal_loop import LiteralLoop

    with tempfile.TemporaryDirectory(prefix="raymoe-literal-") as scratch:
        loop = LiteralLoop(cfg, Path(scratch))
        loop.train_epoch(max_steps=warmup)
        timed = loop.train_epoch(max_steps=steps)
        eval_seconds = loop.evaluate()["eval_seconds"]
    epoch_seconds = timed["train_seconds"] / timed["samples"] * num_train + eval_seconds
    return num_train / epoch_seconds
