"""Per-trial resource needs, the fail-fast check against the cluster, and the default trial concurrency.

A trial is a Tune function (the Train driver, nearly idle: TRIAL_DRIVER_CPUS) plus `num_workers` Ray Train
workers, or (resources.launcher in_trial) a Tune function that trains itself with one worker's resources.
A worker has `cpus_per_worker` CPUs and `gpus_per_worker` GPUs; fractional GPUs pack small trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raymoe.errors import ConfigError
from raymoe.tune.sweep_schema import ResourcesConfig

TRIAL_DRIVER_CPUS = 0.01  # the trial only waits on trainer.fit(); a whole CPU would halve concurrency on 2 cores


@dataclass(frozen=True)
class TrialNeed:
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float  # 0 without GPUs
    in_trial: bool = False  # the trial trains in its own process (no separate Train driver)

    @classmethod
    def of(cls, res: ResourcesConfig) -> "TrialNeed":
        gpus = (1.0 if res.gpus_per_worker is None else res.gpus_per_worker) if res.use_gpu else 0.0
        return cls(res.num_workers, res.cpus_per_worker, gpus, res.in_trial)

    @property
    def cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker + (0.0 if self.in_trial else TRIAL_DRIVER_CPUS)

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker

    def trial_actor(self) -> dict[str, float]:
        """Resources of the trial's own actor: the whole worker when it trains in-process, else a driver sliver."""
        if not self.in_trial:
            return {"cpu": TRIAL_DRIVER_CPUS}
        return {key.lower(): value for key, value in self.worker_bundle().items()}  # Tune spells them lower-case

    def worker_bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker
        return bundle


def check_fits(need: TrialNeed, nodes: list[dict[str, float]]) -> None:
    """Raise ConfigError (with the numbers) when no node can hold one worker, or the cluster not one trial.

    Args:
        need: one trial's resources.
        nodes: the `Resources` dict of every alive node (ray.nodes()).
    """
    if not nodes:
        raise ConfigError("resources", "no nodes", "the Ray cluster has no alive nodes")
    bundle = need.worker_bundle()
    if not any(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes):
        best_cpu = max(node.get("CPU", 0.0) for node in nodes)
        best_gpu = max(node.get("GPU", 0.0) for node in nodes)
        raise ConfigError("resources", bundle, f"no node can hold one Train worker: the largest node has "
                          f"{best_cpu:g} CPUs and {best_gpu:g} GPUs")
    total_cpu = sum(node.get("CPU", 0.0) for node in nodes)
    total_gpu = sum(node.get("GPU", 0.0) for node in nodes)
    if need.cpus > total_cpu + 1e-9 or need.gpus > total_gpu + 1e-9:
        raise ConfigError("resources", f"{need.cpus:g} CPUs, {need.gpus:g} GPUs",
                          f"one trial needs more than the cluster has ({total_cpu:g} CPUs, {total_gpu:g} GPUs)")


def default_concurrency(need: TrialNeed, nodes: list[dict[str, float]]) -> int:
    """How many trials fit at once: the limiting resource over the per-trial need (at least 1)."""
    total_cpu = sum(node.get("CPU", 0.0) for node in nodes)
    limits = [math.floor(total_cpu / need.cpus + 1e-9)]
    if need.gpus > 0:
        total_gpu = sum(node.get("GPU", 0.0) for node in nodes)
        limits.append(math.floor(total_gpu / need.gpus + 1e-9))
    return max(1, min(limits))


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
