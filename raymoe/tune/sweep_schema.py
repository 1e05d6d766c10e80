"""Typed sweep config: a base experiment plus a search space (Optuna) or the paper's grid rows.

A sweep file maps 1:1 onto `SweepConfig`; strict types and unknown keys are checked by the experiment
loader's `from_dict`, cross-field rules by `raymoe.tune.sweep_load.load_sweep`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

ParamType = Literal["categorical", "int", "float", "loguniform"]
Mode = Literal["min", "max"]

# Per-epoch metrics that train_fn (raymoe.train.loop) logs to MLflow and reports to Tune from rank 0.
# Kept by hand; tests/test_sweep_config.py checks each name against what train_fn reports.
LOOP_METRICS = (
    "test_error", "train_error", "test_loss", "train_loss", "top5_error",
    "mi_pred_bits", "mi_true_bits", "sample_entropy_bits", "usage_entropy_bits", "importance_cv",
    "epoch_seconds", "train_seconds", "eval_seconds", "samples_per_s", "data_fraction", "lr",
    # language models (model.arch gpt / gpt_moe)
    "val_loss", "val_perplexity", "val_bits_per_byte", "val_error", "test_perplexity", "test_bits_per_byte",
    "mi_current_token_bits", "mi_next_token_bits", "mi_position_bits", "dead_expert_frac", "targets_per_s",
    # routing (docs/observatory.md): every MoE (max_load_share at the top level for the image models only)
    "max_load_share", "routing_churn", "routing_ami",
)
IMAGE_ONLY = ("test_error", "top5_error", "mi_pred_bits", "mi_true_bits", "importance_cv", "max_load_share")
# Per-gate keys that token-level models also report per MoE layer as "layer{i}/<key>" (raymoe/metrics/).
PER_LAYER = ("mi_true_bits", "mi_pred_bits", "sample_entropy_bits", "usage_entropy_bits", "importance_cv", "router_z",
             "dropped_frac", "max_load_share", "dead_expert_frac", "routing_churn", "routing_ami",
             "mi_current_token_bits", "mi_next_token_bits", "mi_position_bits")
_REPORTED = re.compile(r"^(?:layer\d+/)?(?:" + "|".join(PER_LAYER) + r"|load_share/\d+)$"
                       r"|^reg_\w+$|^grad_norm$")  # regularizer terms; the global norm when clipping


def is_reported(metric: str) -> bool:
    """A metric train_fn reports: the loop's own, a per-layer / per-expert routing key (layer1/dead_expert_frac,
    load_share/3), a regularizer term (reg_importance) or grad_norm; tests/test_sweep_config.py checks both
    directions against what train_fn reports."""
    return metric in LOOP_METRICS or bool(_REPORTED.match(metric))


LM_ONLY = ("val_perplexity", "val_bits_per_byte", "test_perplexity", "test_bits_per_byte",
           "mi_current_token_bits", "mi_next_token_bits", "mi_position_bits")


@dataclass(kw_only=True, slots=True)
class ParamSpec:
    type: ParamType
    choices: list[Any] | None = None  # categorical only
    low: int | float | None = None  # int / float / loguniform (inclusive)
    high: int | float | None = None
    step: int | float | None = None  # discretisation; not with log
    log: bool = False  # log-uniform (loguniform implies it)
    when: dict[str, Any] = field(default_factory=dict)  # {earlier param or config path: value or [values]}; all hold
    apply: bool = True  # False = a sweep-only switch (sampled, recorded, used in `when`), not a config path


@dataclass(kw_only=True, slots=True)
class GridRow:
    method: str  # a preset experiment file, relative to the sweep file (tune_configs/paper/<ds>/*.yaml)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # dotted config path -> values (cartesian product)
    category: str | None = None  # table row label; None = the preset file's stem
    # dotted path -> value for this row only; a value {best_of: ROW, by: METRIC} is taken from ROW's best finished
    # run when this row's stage starts (raymoe.tune.stages)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class AshaConfig:
    max_t: int | None = None  # epochs; None = the base experiment's train.epochs
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass(kw_only=True, slots=True)
class SchedulerConfig:
    asha: AshaConfig | None = None


@dataclass(kw_only=True, slots=True)
class StopOnConfig:
    """Routing-collapse stopper (raymoe/tune/collapse.py): end a trial once `metric` has been above (or below)
    the threshold at `after` evaluations in a row; the sweep goes on."""

    metric: str = "dead_expert_frac"
    above: float | None = None
    below: float | None = None
    after: int = 3


@dataclass(kw_only=True, slots=True)
class ResourcesConfig:
    num_workers: int = 1  # Ray Train workers per trial (sets scaling.num_workers)
    use_gpu: bool = False  # sets scaling.use_gpu
    gpus_per_worker: float | None = None  # fractional packs small trials on one GPU; None = 1 when use_gpu
    cpus_per_worker: float = 1.0
    # how a trial trains: "ray_train" = a TorchTrainer per trial (Train V2 pattern), "in_trial" = train_fn in the
    # trial's own (reused) process, "auto" = in_trial for one worker, ray_train otherwise (EP needs >= 2 workers)
    launcher: Literal["auto", "ray_train", "in_trial"] = "auto"

    @property
    def in_trial(self) -> bool:
        return self.launcher == "in_trial" or (self.launcher == "auto" and self.num_workers == 1)


@dataclass(kw_only=True, slots=True)
class SweepTrackingConfig:
    uri: str | None = None  # None = the base experiment's tracking.uri
    experiment: str | None = None  # None = the base experiment's tracking.experiment


@dataclass(kw_only=True, slots=True)
class SweepConfig:
    name: str  # ray_results/sweeps/<name>, MLflow parent run name, `raymoe report <name>`
    strategy: Literal["optuna", "grid"] = "optuna"
    base: str | dict[str, Any] | None = None  # experiment: inline mapping or a YAML path relative to the sweep file
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted path -> value on the base (or every grid row)
    space: dict[str, Any] = field(default_factory=dict)  # dotted path -> ParamSpec (declaration order = sample order)
    start_points: list[dict[str, Any]] = field(default_factory=list)  # optuna: evaluated first (warm start)
    rows: list[GridRow] = field(default_factory=list)  # grid strategy only
    metric: str | list[str] = "val_error"  # a list -> multi-objective (Pareto front); test_* needs the flag below
    allow_test_objective: bool = False  # selecting on the test set reports optimistic numbers (docs/methodology.md)
    mode: Mode | list[Mode] = "min"
    num_samples: int = 10  # sampled points (each runs once per seed)
    seeds: int | list[int] = 1  # N -> seeds 0..N-1; each point is one trial per seed
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    sampler_seed: int = 0
    scheduler: SchedulerConfig | None = None
    stop_on: StopOnConfig | None = None  # e.g. {metric: dead_expert_frac, above: 0.5, after: 3}
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    max_concurrent_trials: int | None = None  # None = cluster resources // per-trial need
    max_failures: int = 0  # retries of a failed trial (Tune FailureConfig); failed trials never stop the sweep
    tracking: SweepTrackingConfig = field(default_factory=SweepTrackingConfig)

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)
