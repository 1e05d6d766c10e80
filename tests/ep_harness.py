"""Run a function on real Ray Train workers (TorchTrainer, gloo, CPU) and collect what each rank returns.

    from ep_harness import run_on_workers
    results = run_on_workers(my_fn, tmp_path, config={...}, ep_size=2)   # my_fn(ctx: DistContext, config) -> obj
    results[rank]  # whatever my_fn returned on that rank (saved with torch.save, so tensors are fine)

    register_shared("my_case", my_fn, make_config)   # at import: several modules share ONE worker group
    results = shared_results("my_case", tmp_path_factory.getbasetemp() / "ep_shared")

The function and its module are shipped to the workers by value, so functions defined in test files work.
One local Ray instance is shared by every test in the pytest process (started on first use).
Also here: small stand-in experts / MoE models that need none of the paper code.
"""

from __future__ import annotations

import os
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from raymoe.models.output import ModelOutput
from raymoe.moe.dispatch import LocalDispatcher
from raymoe.moe.expert_stack import ExpertStack
from raymoe.moe.routing import GateResult
from raymoe.parallel.context import DistContext

ATOL = 1e-5
COLLECTIVE_TIMEOUT_S = 180  # a rank stuck in a collective (its peer failed) errors out instead of hanging 30 min


def ensure_test_ray() -> None:
    """Local Ray for tests (4 logical CPUs: 2 workers + a driver fit on 2 cores), started once per process."""
    import ray

    from raymoe.train.ray_session import ensure_ray

    if not ray.is_initialized():
        ensure_ray(None, num_cpus_needed=2)


def _ship_by_value(*modules) -> None:
    from ray import cloudpickle

    for module in modules:
        if module is not None and module.__name__ not in ("__main__",) and not module.__name__.startswith("raymoe"):
            cloudpickle.register_pickle_by_value(module)


def _worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: build the DistContext, call the function, save its result."""
    import torch.distributed as dist

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), ep_size=loop_config["ep_size"])
    result = loop_config["fn"](ctx, loop_config["config"])
    out = Path(loop_config["out_dir"]) / f"rank{ctx.rank}.pt"
    torch.save(result, out.with_suffix(".tmp"))
    os.replace(out.with_suffix(".tmp"), out)


def run_on_workers(fn: Callable[[DistContext, Any], Any], tmp_path: str | os.PathLike, *, config: Any = None,
                   num_workers: int = 2, ep_size: int | None = None) -> list[Any]:
    """Run fn(ctx, config) on num_workers Ray Train workers with gloo; return the results in rank order.

    Raises:
        AssertionError: a worker failed (with its traceback).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_test_ray()
    _ship_by_value(sys.modules.get(fn.__module__), sys.modules[__name__])
    out_dir = Path(tmp_path) / f"ranks-{uuid.uuid4().hex[:8]}"
    out_dir.mkdir(parents=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"fn": fn, "config": config, "out_dir": str(out_dir),
                           "ep_size": num_workers if ep_size is None else ep_size},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers),
        run_config=ray.train.RunConfig(name=out_dir.name, storage_path=str(Path(tmp_path).absolute() / "ray")),
        torch_config=TorchConfig(backend="gloo", timeout_s=COLLECTIVE_TIMEOUT_S),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise AssertionError(f"a worker failed:\n{exc}") from None
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(num_workers)]


# ---------------------------------------------------------------- one worker group for several test modules

_SHARED: dict[str, tuple[Callable, Callable | None]] = {}
_SHARED_RESULTS: dict[str, list] = {}
_FAILED = "__ep_harness_failed__"


def register_shared(name: str, fn: Callable[[DistContext, Any], Any],
                    make_config: Callable[[Path], Any] | None = None) -> None:
    """Queue fn(ctx, config) for the shared 2-worker run (call at import time of a test module).

    Every module registered when the first `shared_results` call comes runs in that one Ray Train fit (worker
    start-up dominates these tests); make_config(folder) runs on the driver just before it.
    """
    _SHARED[name] = (fn, make_config)


def _run_registered(ctx: DistContext, config: dict) -> dict:
    out = {}
    for name, fn in config["fns"].items():
        try:
            out[name] = fn(ctx, config["configs"][name])
        except Exception:  # noqa: BLE001 - reported by that module's tests only
            out[name] = {_FAILED: traceback.format_exc()}  # plain dict: the workers cannot import this module
    return out


def shared_results(name: str, root: str | os.PathLike) -> list[Any]:
    """Per-rank results of a registered function (runs every pending registered function once, together)."""
    if name not in _SHARED_RESULTS:
        pending = [n for n in _SHARED if n not in _SHARED_RESULTS]
        root = Path(root)
        configs = {}
        for n in pending:
            make = _SHARED[n][1]
            folder = root / n
            folder.mkdir(parents=True, exist_ok=True)
            configs[n] = make(folder) if make else None
        for n in pending:
            _ship_by_value(sys.modules.get(_SHARED[n][0].__module__))
        per_rank = run_on_workers(_run_registered, root, config={"fns": {n: _SHARED[n][0] for n in pending},
                                                                 "configs": configs})
        for n in pending:
            _SHARED_RESULTS[n] = [r[n] for r in per_rank]
    results = _SHARED_RESULTS[name]
    failed = [f"{name} failed on rank {rank}:\n{result[_FAILED]}" for rank, result in enumerate(results)
              if isinstance(result, dict) and _FAILED in result]
    if failed:  # every rank's traceback: a rank that waits in a collective is usually not the one that broke
        raise AssertionError("\n".join(failed))
    return results


# ---------------------------------------------------------------- stand-in experts and MoE (no paper code needed)


class TinyExperts(ExpertStack):
    """E experts y = tanh(flatten(x) @ W_e + b_e), with parameters stacked on a leading expert dim."""

    def __init__(self, num_experts: int, d_in: int, d_out: int):
        super().__init__(num_experts)
        self.w_EXY = nn.Parameter(torch.randn(num_experts, d_in, d_out) / d_in ** 0.5)
        self.b_EY = nn.Parameter(torch.randn(num_experts, d_out) * 0.1)
        self.register_buffer("calls_E", torch.zeros(num_experts))

    def forward_grouped(self, x_RX: torch.Tensor, counts: list[int]) -> torch.Tensor:
        x_RX = x_RX.flatten(1)
        outs = [torch.tanh(chunk @ self.w_EXY[i] + self.b_EY[i]) for i, chunk in enumerate(x_RX.split(counts))]
        if self.training:
            self.calls_E += torch.tensor([float(c > 0) for c in counts])
        return torch.cat(outs) if outs else x_RX.new_zeros((0, self.b_EY.shape[1]))


class TinyMoE(nn.Module):
    """A small sample-level MoE with a BatchNorm'd gate: dense softmax mixture or sparse top-k."""

    def __init__(self, num_experts: int = 4, d_in: int = 6, num_classes: int = 3, top_k: int | None = None):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Sequential(nn.Linear(d_in, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_experts))
        self.experts = TinyExperts(num_experts, d_in, num_classes)
        self.dispatcher = LocalDispatcher(num_experts)

    def forward(self, x_BX: torch.Tensor) -> ModelOutput:
        B, E = x_BX.shape[0], self.experts.num_experts
        logits_BE = self.gate(x_BX)
        probs_BE = logits_BE.softmax(-1)
        if self.top_k is None:
            weights_BK, experts_BK = probs_BE, torch.arange(E).expand(B, E)
        else:
            weights_BK, experts_BK = probs_BE.topk(self.top_k, dim=-1)
        x_PX = x_BX.repeat_interleave(experts_BK.shape[1], dim=0)
        x_RX, counts, meta = self.dispatcher.dispatch(x_PX, experts_BK.reshape(-1))
        y_PY = self.dispatcher.combine(self.experts.forward_grouped(x_RX, counts), meta)
        y_BKY = y_PY.view(B, experts_BK.shape[1], -1)
        mixture_BY = (weights_BK.unsqueeze(-1) * y_BKY.softmax(-1)).sum(1)
        gate = GateResult(probs_NE=probs_BE, weights_NK=weights_BK, experts_NK=experts_BK, logits_NE=logits_BE)
        return ModelOutput(log_probs_BC=torch.log(mixture_BY + 1e-7), gates=[gate])
