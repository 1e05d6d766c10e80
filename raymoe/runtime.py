"""The process-wide runtime: device choice, bf16 support, CPU threads, seeding, and the CPU settings (subnormals,
glibc's allocator, deterministic kernels) that every entry point applies before it builds anything."""

from __future__ import annotations

import ctypes
import os
import random
import sys

import numpy as np
import torch
import torch.utils.deterministic

from raymoe.errors import ConfigError


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


def bf16_supported(device: torch.device) -> bool:
    """bf16 arithmetic in hardware: CUDA devices that report it, CPUs with AVX512-BF16 or AMX (oneDNN's check)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    return False


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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(mmap_threshold_bytes: int = 256 << 20) -> bool:
    """Let glibc keep freed heap memory for the next step instead of handing it back to the kernel.

    Every CPU training step frees and re-allocates the same activations and gradients. By default glibc trims the
    top of its heap and serves blocks above an adaptive threshold (at most 32 MB) from fresh mmaps, so the next
    step touches those pages again, and a page fault costs ~3.5 us in this VM. Measured: an FMNIST paper-MoE
    step touched ~1,500 fresh pages (4-6 ms of 38 ms) and ~10 with this, same 1.05 GB peak RSS; the token MoE
    layer at T=4096, E=16, top-2 (64 MB expert gradients) went from ~65,000 faults and 640 ms per step to
    ~4,000 and 590 ms; peak RSS 3.2 GB after 150 steps (default: 2.9 GB after 60, still growing).
    Blocks above `mmap_threshold_bytes` still come from mmap and go back on free.
    Returns False where the C library is not glibc (nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold_bytes), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20)))


def prepare_cpu_process() -> None:
    """Process-wide CPU settings every training process makes first: subnormals flushed, freed memory kept."""
    flush_denormals()
    keep_freed_memory()


def make_deterministic(device: torch.device) -> None:
    """Deterministic kernels on CPU (where they cost little); GPUs keep their fast kernels.

    The NaN-filling of every fresh allocation that deterministic mode also switches on only guards kernels that
    read uninitialised memory (none do here) and made CPU training steps ~2x slower (a fill per activation).
    """
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False


def prepare_process(device: torch.device) -> int:
    """What every entry point (train_fn in each Ray worker or Tune trial, the benchmarks) does first for its
    device: the CPU settings above, this process's share of the cores, deterministic CPU kernels. Returns the
    intra-op thread count."""
    prepare_cpu_process()
    threads = set_cpu_threads() if device.type == "cpu" else torch.get_num_threads()
    make_deterministic(device)
    return threads

