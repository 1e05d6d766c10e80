"""Device choice, CPU threads and seeding: everything process-wide a run sets before it builds anything."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch
import torch.utils.deterministic

from raymoe.config.errors import ConfigError


def in_ray_train_worker() -> bool:
    """True inside a Ray Train worker (only checked when Ray is already imported: local runs never pay for it)."""
    if "ray" not in sys.modules:
        return False
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return True
    except Exception:  # noqa: BLE001 - outside a Train worker get_context raises
        return False


def pick_device(kind: str) -> torch.device:
    """`train.device`: auto = CUDA when available (Ray Train's assigned GPU in a worker), else CPU."""
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if kind == "cuda":
            raise ConfigError("train.device", kind, "no CUDA device is available here (use auto or cpu)")
        return torch.device("cpu")
    if in_ray_train_worker():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda", torch.cuda.current_device())


def set_cpu_threads(local_world_size: int = 1) -> int:
    """Share this machine's cores among the local workers; an explicit OMP_NUM_THREADS wins (Ray sets it)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        threads = max(1, cores // max(1, local_world_size))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank): a resumed run draws exactly what an
    uninterrupted one would have drawn from this epoch on."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def flush_denormals() -> None:
    """Treat subnormal floats as zero on the CPU. Adam moments of rarely-used weights decay into the subnormal
    range, where x86 arithmetic is ~100x slower: without this an FMNIST MoE step slowed from ~70 to ~170 ms
    after a few dozen steps. Call it before any other torch work so the intra-op threads inherit the mode."""
    torch.set_flush_denormal(True)


def make_deterministic(device: torch.device) -> None:
    """Deterministic kernels on CPU (where they cost little); GPUs keep their fast kernels.

    The NaN-filling of every fresh allocation that deterministic mode also switches on only guards kernels that
    read uninitialised memory (none do here) and made CPU training steps ~2x slower (a fill per activation).
    """
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
