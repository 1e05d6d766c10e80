"""`raymoe bench ep`: expert-parallel training throughput, 1 worker vs N workers with EP = N, same global batch.

Runs on real Ray Train workers (TorchTrainer, gloo on CPU / NCCL on GPU) with synthetic data of the data set's
shape (the benchmark measures the model step, not the data pipeline), through the same train_epoch as
`raymoe train`. Prints one JSON line per configuration: samples/s, bytes this rank sent per step, and the
fraction of step time inside collectives (raymoe.parallel.comm_meter; it includes waiting for the slower
rank at each collective), how unevenly the gate spread the pairs over the EP ranks (busiest rank / mean), then
a summary line with the speedup of the medians over --repeats alternating runs.
Each worker gets cores // workers torch threads, so both runs use the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="cifar100", choices=["mnist", "fashion_mnist", "cifar10", "cifar100"])
    parser.add_argument("--experts", type=int, default=20)
    parser.add_argument("--gate", default="attentive", choices=["softmax", "attentive", "topk", "noisy_topk"])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (paper CIFAR-100: 256)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after --warmup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts; EP = workers")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternate the worker counts this many times; the summary compares medians (a shared "
                             "VM's speed drifts by +-20%% between runs)")
    parser.add_argument("--learn", action="store_true",
                        help="let the weights move (train.lr); by default the optimizer runs with lr 0, so the "
                             "routing stays at its initial state and every timed step of every run does the same "
                             "work (a top-k gate trained on the one repeated synthetic batch collapses onto 2 "
                             "experts within a few steps)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")


SHAPES = {"mnist": (1, 28, 10), "fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100)}


def _bench_worker(config: dict) -> None:
    """On each Ray Train worker: build the model, run warmup + timed steps, report the numbers."""
    import ray.train
    import torch
    import torch.distributed as dist

    from raymoe.config.load import load_experiment
    from raymoe.models.build import build_model
    from raymoe.parallel.comm_meter import METER
    from raymoe.parallel.context import DistContext
    from raymoe.parallel.expert_parallel import apply_expert_parallel
    from raymoe.runtime import pick_device, prepare_cpu_process
    from raymoe.train.loop import make_optimizer
    from raymoe.train.step import train_epoch

    prepare_cpu_process()  # as train_fn does
    cfg = load_experiment(raw=config["experiment"])
    device = pick_device("cuda" if config["gpu"] else "cpu")
    world = dist.get_world_size() if dist.is_initialized() else 1
    threads = None
    if device.type == "cpu":
        threads = config["threads"]
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    ctx = DistContext.from_env(cfg.scaling.expert_parallel, device)
    channels, side, classes = SHAPES[cfg.data.name]
    model = build_model(cfg, classes, channels, side).to(device)
    model = apply_expert_parallel(model, ctx) if ctx.distributed else model
    optimizer = make_optimizer(cfg.train, model)
    if not config["learn"]:  # the full optimizer step still runs, the weights (and so the routing) stay fixed
        for group in optimizer.param_groups:
            group["lr"] = 0.0
    batch = cfg.train.batch_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, side, side, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    lo, hi = ctx.rank * batch // world, (ctx.rank + 1) * batch // world
    x, y = x[lo:hi].to(device), y[lo:hi].to(device)

    def run(steps: int):
        batches = [(x, y)] * steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        return train_epoch(model, optimizer, batches, reg_cfg=cfg.regularizer, ctx=ctx, epoch=1,
                           num_samples=batch * steps, batch_size=batch)

    run(config["warmup"])
    METER.enabled = True
    METER.reset()
    ctx.barrier()
    start = time.perf_counter()
    result = run(config["steps"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = torch.tensor([METER.seconds, METER.bytes_sent, seconds], dtype=torch.float64)
    per_rank = [torch.zeros_like(stats) for _ in range(world)]
    if ctx.distributed:
        dist.all_gather(per_rank, stats)
    else:
        per_rank = [stats]
    steps = result.steps
    report = {
        "expert_rows_max_rank_over_mean": _rank_load_imbalance(model, x, cfg.model.num_experts, ctx),
        "samples_per_s": batch * steps / max(float(s[2]) for s in per_rank),
        "step_ms": 1000 * max(float(s[2]) for s in per_rank) / steps,
        "comm_fraction": max(float(s[0] / s[2]) for s in per_rank),
        "bytes_sent_per_step_per_rank": max(float(s[1]) for s in per_rank) / steps,
        "torch_threads": threads,
        "loss": result.loss,
    }
    # Train V2 keeps metrics only when a checkpoint comes with them: rank 0 attaches a one-file folder
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ctx.is_main:
            (Path(folder) / "metrics.json").write_text(json.dumps(report))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(report, checkpoint=checkpoint)


def _rank_load_imbalance(model, x, num_experts: int, ctx) -> float:
    """(item, expert) pairs the busiest EP rank's experts get, over the mean (1.0 for dense gates): the slower
    rank sets the pace at every exchange."""
    import torch

    with torch.no_grad():
        experts_NK = model(x).gates[0].experts_NK
    owner = experts_NK[experts_NK >= 0] // (num_experts // ctx.ep_size)
    load_W = ctx.all_reduce_sum(torch.bincount(owner, minlength=ctx.ep_size).double())
    return round(float(load_W.max() / load_W.mean()), 3)


def _experiment(args: argparse.Namespace, workers: int) -> dict:
    gate = {"kind": args.gate}
    if args.gate in ("topk", "noisy_topk"):
        gate["top_k"] = args.top_k
    return {"name": "bench-ep", "seed": 0, "data": {"name": args.dataset}, "model": {"num_experts": args.experts},
            "gate": gate, "train": {"batch_size": args.batch_size, "progress": False},
            "scaling": {"num_workers": workers, "expert_parallel": workers, "use_gpu": args.gpu},
            "tracking": {"enabled": False}}


def run(args: argparse.Namespace) -> int:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raymoe.config.load import load_experiment
    from raymoe.train.ray_session import ensure_ray

    started = ensure_ray(args.address, max(args.workers), max(args.workers) if args.gpu else 0)
    # cores of this machine (local) or of the cluster, shared evenly: both runs use all of them
    cores = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)) if args.address else (os.cpu_count() or 1)
    results: dict[int, list[dict]] = {w: [] for w in args.workers}
    try:
        with tempfile.TemporaryDirectory() as storage:
            for repeat, workers in ((r, w) for r in range(max(1, args.repeats)) for w in args.workers):
                raw = _experiment(args, workers)
                load_experiment(raw=raw)  # bad combinations (EP not dividing the experts) fail here
                trainer = TorchTrainer(
                    _bench_worker,
                    train_loop_config={"experiment": raw, "gpu": args.gpu, "steps": args.steps, "learn": args.learn,
                                       "warmup": args.warmup, "threads": max(1, cores // workers)},
                    scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=args.gpu,
                                                           resources_per_worker={"CPU": max(1, cores // workers)}),
                    run_config=ray.train.RunConfig(name=f"bench-ep-{workers}-{repeat}", storage_path=storage),
                    torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
                )
                metrics = dict(trainer.fit().metrics or {})
                line = {"bench": "ep", "launcher": "ray_train", "device": "cuda" if args.gpu else "cpu",
                        "dataset": args.dataset, "experts": args.experts, "gate": args.gate,
                        "global_batch": args.batch_size, "workers": workers, "expert_parallel": workers,
                        "repeat": repeat,
                        "cores": cores, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}}
                print(json.dumps(line), flush=True)
                results[workers].append(metrics)
    finally:
        if started:
            ray.shutdown()

    def median(workers: int, key: str) -> float:
        return statistics.median(m[key] for m in results[workers])

    base = median(min(args.workers), "samples_per_s")
    for workers in args.workers:
        if workers != min(args.workers):
            print(json.dumps({"bench": "ep", "summary": f"{workers} workers vs {min(args.workers)}",
                              "runs_each": len(results[workers]),
                              "median_samples_per_s": {w: round(median(w, "samples_per_s"), 1)
                                                       for w in (min(args.workers), workers)},
                              "speedup": round(median(workers, "samples_per_s") / base, 3),
                              "per_run_speedups": [round(a["samples_per_s"] / b["samples_per_s"], 3) for a, b in
                                                   zip(results[workers], results[min(args.workers)])]}), flush=True)
    return 0
