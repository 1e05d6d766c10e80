"""Sweep YAML -> checked `Sweep`: as strict as experiments (ConfigError naming the field path; nothing started).

Besides types and unknown keys, the space is checked against the experiment schema: every applied path
must exist, and the extreme values of every parameter (low, high, each choice) are pushed through
`load_experiment` on the base, so a value the experiment would reject on its own is a sweep error now,
not a failed trial later. Errors that only arise from a *combination* of values are left to the trial.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raymoe.errors import ConfigError
from raymoe.config.load import (SEED_MAX, apply_overrides, flatten, from_dict, load_experiment, read_yaml,
                                to_dict)
from raymoe.config.schema import ExperimentConfig
from raymoe.tune.points import GridPoint, expand_grid, expand_row, row_category
from raymoe.tune.stages import is_reference, parse_reference, stage_numbers
from raymoe.tune.sweep_schema import LOOP_METRICS, PER_LAYER, ParamSpec, SweepConfig, is_reported

MAX_TRIALS = 100_000  # sampled points of one sweep; more is a typo, not a plan
MAX_SEEDS = 10_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Sweep:
    """A checked sweep: the typed config plus everything resolved from it (plain, picklable data)."""

    config: SweepConfig
    path: str | None  # absolute path of the sweep file (None for an inline mapping)
    text: str  # the sweep file as written (logged as an artifact on the parent run)
    base_raw: dict[str, Any] | None  # optuna: the base experiment with the sweep's fixed overrides applied
    base: ExperimentConfig | None  # optuna: base_raw checked
    space: dict[str, ParamSpec] = field(default_factory=dict)
    row_raws: dict[str, dict[str, Any]] = field(default_factory=dict)  # grid: preset path -> raw with overrides
    points: list[GridPoint] = field(default_factory=list)  # grid: every trial

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def digest(self) -> str:
        """Fingerprint of the definition (the file and everything the command line changed in it, except how many
        trials run at once): a resume must use the same one."""
        from dataclasses import asdict

        definition = {k: v for k, v in asdict(self.config).items() if k != "max_concurrent_trials"}  # may change
        blob = json.dumps({"text": self.text, "definition": definition}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def num_trials(self) -> int:
        if self.config.strategy == "grid":
            return len(self.points)
        return self.config.num_samples * len(self.config.seed_list)

    @property
    def epochs(self) -> int:
        if self.base is not None:
            return self.base.train.epochs
        return max(load_experiment(raw=raw).train.epochs for raw in self.row_raws.values())


def load_sweep(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] = (),
               raw: dict[str, Any] | None = None, name: str | None = None, quick: bool = False,
               max_concurrent: int | None = None, sweep_overrides: list[str] | dict[str, Any] = ()) -> Sweep:
    """Read and check a sweep file.

    Args:
        path: the sweep YAML (relative `base:` / `rows[].method` paths resolve against its folder).
        overrides: extra experiment overrides (`--set a.b=v`), applied after the file's `overrides:`.
        raw: an inline sweep mapping instead of a file (relative paths resolve against the cwd).
        name: replaces the sweep's `name`.
        max_concurrent: `--max-concurrent`: replaces max_concurrent_trials, checked by the same rule.
        sweep_overrides: `--sweep-set KEY=VALUE` on the sweep's own keys (num_samples, seeds, resources.*, ...),
            applied to the file's mapping before it is type-checked, so a bad value is refused like one in the file.
        quick: a grid's quick reproduction: one seed per row at the row's preset values (no grid lists), named
            `<name>-quick` unless `name` is given (docs/methodology.md).

    Raises:
        ConfigError: naming the sweep field path (e.g. `space.train.lr.low`) and the bad value.
    """
    if raw is None:
        if path is None:
            raise ConfigError("sweep", None, "give a sweep file")
        from raymoe.config.yaml_file import read_mapping

        path = Path(path).resolve()
        raw, text = read_mapping(path, "sweep")
        folder = path.parent
    else:
        raw = copy.deepcopy(raw)
        text = yaml.safe_dump(raw, sort_keys=False)
        folder = Path.cwd()
    if name is not None:
        raw["name"] = name
    sweep_sets = _override_dict(sweep_overrides)
    if sweep_sets:
        try:
            raw = apply_overrides(raw, sweep_sets, SweepConfig)
        except ConfigError as exc:
            raise ConfigError(f"--sweep-set {exc.path}", exc.value, exc.problem) from None
    extra = _override_dict(overrides)
    cfg = from_dict(SweepConfig, raw)
    if quick:
        _require(cfg.strategy == "grid", "--quick", cfg.strategy, "quick mode is for grid sweeps (the paper tables)")
        cfg.seeds = cfg.seed_list[:1]
        for row in cfg.rows:
            row.grid = {}
        if name is None:
            cfg.name = f"{cfg.name}-quick"
    cfg.overrides = {**cfg.overrides, **extra}
    if max_concurrent is not None:
        cfg.max_concurrent_trials = max_concurrent
    try:
        _check_top_level(cfg)
    except ConfigError as exc:
        if max_concurrent is not None and exc.path == "max_concurrent_trials":
            raise ConfigError("--max-concurrent", exc.value, exc.problem) from None
        raise
    sweep_path = str(path) if path is not None else None
    if cfg.strategy == "grid":
        return _load_grid(cfg, folder, sweep_path, text)
    return _load_optuna(cfg, folder, sweep_path, text)


def _override_dict(overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(overrides, dict):
        return dict(overrides)
    from raymoe.config.load import parse_override

    return dict(parse_override(item) for item in overrides)


def _require(ok: bool, path: str, value: Any, problem: str) -> None:
    if not ok:
        raise ConfigError(path, value, problem)


def _check_top_level(cfg: SweepConfig) -> None:
    _require(bool(_NAME.match(cfg.name)), "name", cfg.name,
             "must start with a letter or digit and hold only letters, digits, '_', '.', '-'")
    metrics, modes = cfg.metrics, cfg.modes
    _require(len(metrics) >= 1, "metric", cfg.metric, "give at least one metric")
    for i, metric in enumerate(metrics):
        where = "metric" if isinstance(cfg.metric, str) else f"metric[{i}]"
        _require(is_reported(metric), where, metric,
                 f"unknown metric; the training loop reports {list(LOOP_METRICS)} and per MoE layer "
                 f"layer<i>/<key> for {list(PER_LAYER)}, load_share/<expert>")
    _require(len(set(metrics)) == len(metrics), "metric", cfg.metric, "lists a metric twice")
    tests = [m for m in metrics if m.startswith("test_")]
    _require(not tests or cfg.allow_test_objective, "metric", cfg.metric,
             f"{tests[0] if tests else ''} selects on the test set, which makes every reported number optimistic; "
             f"use val_error / val_loss (or train_error, the paper's protocol), or set allow_test_objective: true")
    _require(len(modes) == len(metrics), "mode", cfg.mode,
             f"needs one of min/max per metric ({len(metrics)} metric(s), {len(modes)} mode(s))")
    _require(1 <= cfg.num_samples <= MAX_TRIALS, "num_samples", cfg.num_samples, f"must be in [1, {MAX_TRIALS}]")
    _require(isinstance(cfg.seeds, list) or 1 <= cfg.seeds <= MAX_SEEDS, "seeds", cfg.seeds,
             f"must be a count in [1, {MAX_SEEDS}] or a list of seeds")
    _require(not isinstance(cfg.seeds, list) or len(cfg.seeds) <= MAX_SEEDS, "seeds", "[...]",
             f"at most {MAX_SEEDS} seeds")
    seeds = cfg.seed_list
    _require(0 <= cfg.sampler_seed <= SEED_MAX, "sampler_seed", cfg.sampler_seed,
             f"must be in [0, {SEED_MAX}] (Optuna's samplers take a 32-bit seed)")
    bad = [s for s in seeds if not 0 <= s <= SEED_MAX]
    _require(not bad, "seeds", bad[:3], f"every seed must be in [0, {SEED_MAX}] (a 32-bit seed)")
    _require(len(seeds) >= 1, "seeds", cfg.seeds, "must be >= 1 (a count) or a non-empty list")
    _require(len(set(seeds)) == len(seeds), "seeds", cfg.seeds, "lists a seed twice")
    if cfg.scheduler is not None and cfg.scheduler.asha is not None:
        asha = cfg.scheduler.asha
        _require(len(metrics) == 1, "scheduler.asha", "asha",
                 "ASHA stops trials on one metric; drop it for a multi-objective sweep")
        _require(asha.max_t is None or asha.max_t >= 1, "scheduler.asha.max_t", asha.max_t, "must be >= 1")
        _require(asha.grace_period >= 1, "scheduler.asha.grace_period", asha.grace_period, "must be >= 1")
        _require(asha.max_t is None or asha.grace_period <= asha.max_t, "scheduler.asha.grace_period",
                 asha.grace_period, f"must be <= max_t ({asha.max_t})")
        _require(asha.reduction_factor > 1, "scheduler.asha.reduction_factor", asha.reduction_factor, "must be > 1")
    if cfg.stop_on is not None:
        stop = cfg.stop_on
        _require(is_reported(stop.metric), "stop_on.metric", stop.metric,
                 f"unknown metric; the training loop reports {list(LOOP_METRICS)} and per-layer keys")
        _require((stop.above is None) != (stop.below is None), "stop_on", "above/below",
                 "give exactly one of above or below")
        threshold = stop.above if stop.above is not None else stop.below
        where = "stop_on.above" if stop.above is not None else "stop_on.below"
        bounded = stop.metric.split("/")[-1] in ("dead_expert_frac", "max_load_share", "routing_churn",
                                                 "routing_ami") or "load_share/" in stop.metric
        _require(not bounded or -1.0 <= threshold <= 1.0, where, threshold, f"{stop.metric} lies in [0, 1] "
                 "(AMI in [-1, 1]); a threshold outside it never or always fires")
        _require(1 <= stop.after <= 10_000, "stop_on.after", stop.after, "must be in [1, 10000] evaluations")
    res = cfg.resources
    _require(res.num_workers >= 1, "resources.num_workers", res.num_workers,
             "must be >= 1 (each trial is a Ray Train run)")
    _require(res.cpus_per_worker > 0, "resources.cpus_per_worker", res.cpus_per_worker, "must be > 0")
    _require(res.launcher != "in_trial" or res.num_workers == 1, "resources.launcher", res.launcher,
             f"trains in the trial's own process, so it needs num_workers: 1 (got {res.num_workers}); "
             f"use ray_train or auto")
    if res.gpus_per_worker is not None:
        _require(res.use_gpu, "resources.gpus_per_worker", res.gpus_per_worker, "set resources.use_gpu: true too")
        _require(0 < res.gpus_per_worker <= 1 or float(res.gpus_per_worker).is_integer(),
                 "resources.gpus_per_worker", res.gpus_per_worker, "must be a fraction in (0, 1] or a whole number")
    _require(cfg.max_concurrent_trials is None or 1 <= cfg.max_concurrent_trials <= MAX_TRIALS,
             "max_concurrent_trials", cfg.max_concurrent_trials,
             f"must be in [1, {MAX_TRIALS}] (or null to derive it from the cluster)")
    _require(0 <= cfg.max_failures <= 1000, "max_failures", cfg.max_failures, "must be in [0, 1000]")
    if cfg.strategy == "grid":
        _require(not cfg.space, "space", "...", "a grid sweep lists rows, not a space (or use strategy: optuna)")
        _require(bool(cfg.rows), "rows", cfg.rows, "a grid sweep needs at least one row")
        _require(not cfg.start_points, "start_points", "...", "start points belong to strategy: optuna")
    else:
        _require(not cfg.rows, "rows", "...", "rows belong to strategy: grid")
        _require(cfg.base is not None, "base", None, "an optuna sweep needs a base experiment (mapping or path)")
        _require(bool(cfg.space), "space", cfg.space, "empty: nothing to search")


def _check_val_metrics(cfg: SweepConfig, experiment: ExperimentConfig, where: str) -> None:
    """A val_* objective needs a validation split: image runs hold one out unless data.val_fraction is null."""
    from raymoe.config.schema import LM_ARCHS

    if experiment.model.arch in LM_ARCHS or experiment.data.val_fraction is not None:
        return
    vals = [m for m in cfg.metrics if m.startswith("val_")]
    _require(not vals, "metric", cfg.metric, f"{vals[0] if vals else ''} needs a validation split, but "
             f"{where} sets data.val_fraction: null (the paper's protocol); select by train_error instead, or "
             f"hold out a share with data.val_fraction")


def _fixed_overrides(cfg: SweepConfig) -> dict[str, Any]:
    """Settings every trial gets: the file's overrides, resources, tracking; no progress bars in trials."""
    res = cfg.resources
    fixed = {"scaling.num_workers": res.num_workers, "scaling.use_gpu": res.use_gpu,
             "scaling.cpus_per_worker": res.cpus_per_worker, "train.progress": False}
    if res.use_gpu and res.gpus_per_worker is not None:
        fixed["scaling.gpus_per_worker"] = res.gpus_per_worker
    if cfg.tracking.uri is not None:
        fixed["tracking.uri"] = cfg.tracking.uri
    if cfg.tracking.experiment is not None:
        fixed["tracking.experiment"] = cfg.tracking.experiment
    return {**fixed, **cfg.overrides}


def _resolve_experiment(raw: dict[str, Any], fixed: dict[str, Any], where: str) -> tuple[dict, ExperimentConfig]:
    """Apply the sweep's fixed overrides and check; errors are re-labelled under `where` (e.g. `base`)."""
    try:
        with_fixed = apply_overrides(raw, fixed)
    except ConfigError as exc:
        raise ConfigError(f"overrides.{exc.path}", exc.value, exc.problem) from None
    try:
        return with_fixed, load_experiment(raw=with_fixed)
    except ConfigError as exc:
        label = f"overrides.{exc.path}" if exc.path in fixed else f"{where}.{exc.path}"
        raise ConfigError(label, exc.value, exc.problem) from None


def _load_optuna(cfg: SweepConfig, folder: Path, path: str | None, text: str) -> Sweep:
    if isinstance(cfg.base, str):
        base_raw = read_yaml(folder / cfg.base, "base")
    else:
        base_raw = copy.deepcopy(cfg.base)
    base_raw.setdefault("name", cfg.name)
    base_raw, base = _resolve_experiment(base_raw, _fixed_overrides(cfg), "base")
    _check_val_metrics(cfg, base, "base")
    space = _parse_space(cfg.space, base_raw, flatten(to_dict(base)))
    _check_start_points(cfg, space)
    return Sweep(config=cfg, path=path, text=text, base_raw=base_raw, base=base, space=space)


def _parse_space(raw_space: dict[str, Any], base_raw: dict, static: dict[str, Any]) -> dict[str, ParamSpec]:
    space: dict[str, ParamSpec] = {}
    for key, raw_spec in raw_space.items():
        where = f"space.{key}"
        _require(isinstance(key, str) and bool(key), "space", key, "parameter names must be non-empty strings")
        spec = from_dict(ParamSpec, raw_spec, where)
        _check_spec(key, spec, where)
        _check_conditions(key, spec, space, static, where)
        if spec.apply:
            try:
                apply_overrides(base_raw, {key: None})  # the path must exist in the experiment schema
            except ConfigError as exc:
                raise ConfigError(where, key, f"not an experiment setting ({exc.problem}); "
                                  "use apply: false for a sweep-only switch") from None
            _check_extremes(key, spec, space, base_raw, where)
        else:
            _require("." not in key and key not in static, where, key,
                     "a sweep-only switch (apply: false) needs a plain name that is not a config path")
        space[key] = spec
    return space


def _check_start_points(cfg: SweepConfig, space: dict[str, ParamSpec]) -> None:
    """Warm-start points: only declared names, values the parameter can take (combinations are the trial's job)."""
    _require(len(cfg.start_points) <= cfg.num_samples, "start_points", len(cfg.start_points),
             f"more start points than num_samples ({cfg.num_samples})")
    for i, point in enumerate(cfg.start_points):
        for name, value in point.items():
            where = f"start_points[{i}].{name}"
            _require(name in space, where, value, f"not a parameter of the space {sorted(space)}")
            spec = space[name]
            if spec.type == "categorical":
                _require(value in spec.choices, where, value, f"not one of the choices {spec.choices}")
            else:
                if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
                    try:
                        value = point[name] = float(value)
                    except ValueError:
                        pass
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                _require(ok and spec.low <= value <= spec.high, where, value,
                         f"must be a number in [{spec.low}, {spec.high}]")


def _check_spec(key: str, spec: ParamSpec, where: str) -> None:
    if spec.type == "categorical":
        _require(spec.choices is not None and len(spec.choices) > 0, f"{where}.choices", spec.choices,
                 "a categorical parameter needs a non-empty list of choices")
        for i, choice in enumerate(spec.choices):
            _require(choice is None or isinstance(choice, (str, int, float, bool)), f"{where}.choices[{i}]", choice,
                     "choices must be plain values (string, number, bool, null)")
        _require(len({repr(c) for c in spec.choices}) == len(spec.choices), f"{where}.choices", spec.choices,
                 "lists a choice twice")
        for extra in ("low", "high", "step"):
            _require(getattr(spec, extra) is None, f"{where}.{extra}", getattr(spec, extra),
                     "only int/float/loguniform parameters take low/high/step")
        _require(not spec.log, f"{where}.log", spec.log, "only numeric parameters can be log-scaled")
        return
    _require(spec.choices is None, f"{where}.choices", spec.choices,
             f"a {spec.type} parameter takes low/high, not choices")
    _require(spec.low is not None, f"{where}.low", None, "required for numeric parameters")
    _require(spec.high is not None, f"{where}.high", None, "required for numeric parameters")
    for bound in ("low", "high", "step"):
        value = getattr(spec, bound)
        _require(value is None or math.isfinite(value), f"{where}.{bound}", value, "must be finite")
        if spec.type == "int":
            _require(value is None or isinstance(value, int), f"{where}.{bound}", value, "must be an integer")
    _require(spec.low <= spec.high, f"{where}.high", spec.high, f"must be >= low ({spec.low})")
    log = spec.log or spec.type == "loguniform"
    if log:
        _require(spec.low > 0, f"{where}.low", spec.low, "a log-scaled range must be > 0")
        _require(spec.step is None, f"{where}.step", spec.step, "step and log scale exclude each other")
    if spec.step is not None:
        _require(spec.step > 0, f"{where}.step", spec.step, "must be > 0")
        _require(spec.step <= spec.high - spec.low or spec.low == spec.high, f"{where}.step", spec.step,
                 f"is larger than the range [{spec.low}, {spec.high}]")


def _check_conditions(key: str, spec: ParamSpec, earlier: dict[str, ParamSpec], static: dict[str, Any],
                      where: str) -> None:
    for path, wanted in spec.when.items():
        cond = f"{where}.when.{path}"
        _require(path != key, cond, wanted, "a parameter cannot depend on itself")
        values = wanted if isinstance(wanted, list) else [wanted]
        _require(len(values) > 0, cond, wanted, "give a value or a non-empty list of values")
        if path in earlier:
            parent = earlier[path]
            if parent.type == "categorical":
                unreachable = [v for v in values if v not in parent.choices]
                _require(not unreachable, cond, wanted,
                         f"{unreachable} can never be sampled (choices of {path}: {parent.choices}); "
                         "the parameter would never be active")
        elif path in static:
            _require(static[path] in values, cond, wanted,
                     f"{path} is fixed to {static[path]!r} by the base and not searched, so this never holds")
        else:
            _require(False, cond, wanted, "must name an earlier parameter of the space (declaration order) "
                     "or a config path of the base experiment")


def _extremes(spec: ParamSpec) -> list[Any]:
    if spec.type == "categorical":
        return list(spec.choices)
    return [spec.low, spec.high]


def _condition_values(spec: ParamSpec, earlier: dict[str, ParamSpec]) -> dict[str, Any]:
    """One value per condition on an applied parameter, so the extreme-value check sees an active point."""
    out = {}
    for path, wanted in spec.when.items():
        if path in earlier and not earlier[path].apply:
            continue
        out[path] = wanted[0] if isinstance(wanted, list) else wanted
    return out


def _check_extremes(key: str, spec: ParamSpec, earlier: dict[str, ParamSpec], base_raw: dict, where: str) -> None:
    context = _condition_values(spec, earlier)
    for value in _extremes(spec):
        try:
            load_experiment(raw=base_raw, overrides={**context, key: value})
        except ConfigError as exc:
            if exc.path == key or exc.path.startswith(key + "."):  # this value is bad on its own
                raise ConfigError(where, value, exc.problem) from None
            # other paths: a combination problem; the trial with that combination fails with the reason


def _load_grid(cfg: SweepConfig, folder: Path, path: str | None, text: str) -> Sweep:
    fixed = _fixed_overrides(cfg)
    categories = [row_category(row) for row in cfg.rows]
    dupes = sorted({c for c in categories if categories.count(c) > 1})
    _require(not dupes, "rows", dupes, "two rows share a category; set rows[].category to tell them apart")
    row_raws: dict[str, dict[str, Any]] = {}
    depends: dict[str, set[str]] = {}
    where_of: dict[str, str] = {}
    for i, (row, category) in enumerate(zip(cfg.rows, categories)):
        where = f"rows[{i}]"
        method = (folder / row.method).resolve()
        _require(method.is_file(), f"{where}.method", row.method, f"preset file not found ({method})")
        raw = read_yaml(method, f"{where}.method")
        try:
            raw = apply_overrides(raw, fixed)
        except ConfigError as exc:
            raise ConfigError(f"overrides.{exc.path}", exc.value, exc.problem) from None
        for key, values in row.grid.items():
            _require(isinstance(values, list) and len(values) > 0, f"{where}.grid.{key}", values,
                     "give a non-empty list of values")
            _require_setting(raw, key, f"{where}.grid.{key}")
        # a best_of setting is only known when the row's stage starts: check the row without it (null) now
        row_fixed, refs = {}, set()
        for key, value in row.overrides.items():
            _require_setting(raw, key, f"{where}.overrides.{key}")
            _require(key not in row.grid, f"{where}.overrides.{key}", value, "also listed in this row's grid")
            if is_reference(value):
                refs.add(parse_reference(value, f"{where}.overrides.{key}", key, categories, category).best_of)
                value = None
            row_fixed[key] = value
        depends[category], where_of[category] = refs, f"{where}.overrides"
        for point in expand_row(row):  # a grid is finite: check every point exactly as the trial will
            try:
                checked = load_experiment(raw=raw, overrides={**row_fixed, **point, "seed": cfg.seed_list[0]})
            except ConfigError as exc:
                label = (f"{where}.grid.{exc.path}" if exc.path in point else f"{where}.overrides.{exc.path}"
                         if exc.path in row_fixed else f"overrides.{exc.path}" if exc.path in fixed
                         else f"{where}.method.{exc.path}")
                raise ConfigError(label, exc.value, f"{exc.problem} (grid point {point})") from None
            _check_val_metrics(cfg, checked, f"{where}.method")
        row_raws[str(method)] = raw
    stages = stage_numbers(depends, where_of)
    points = expand_grid(cfg.rows, cfg.seed_list, folder, stages)
    return Sweep(config=cfg, path=path, text=text, base_raw=None, base=None, row_raws=row_raws, points=points)


def _require_setting(raw: dict, key: str, where: str) -> None:
    try:
        apply_overrides(raw, {key: None})
    except ConfigError as exc:
        raise ConfigError(where, key, f"not an experiment setting ({exc.problem})") from None
