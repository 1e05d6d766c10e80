"""Run a checked sweep: Ray Tune over Train-driver trials, an MLflow parent run, resume, and the final report.

Order (nothing is started or logged before every check has passed):
  sweep folder free (or --resume with a restorable one) -> tracking store writable -> Ray up with enough
  resources -> MLflow parent -> Tuner.fit / Tuner.restore(...).fit -> reconcile children -> report on the parent.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymoe.errors import ConfigError
from raymoe.tracking.uri import absolute_tracking_uri
from raymoe.tune.sweep_load import Sweep

DEFAULT_STORAGE = "ray_results/sweeps"
# Train V2 controller settings for many short runs: poll workers more often than every 2 s (reports and the end
# of a run are noticed sooner) and skip the preemption-watcher actor (one process less per trial start).
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@dataclass
class SweepOutcome:
    name: str
    sweep_dir: str
    parent_run_id: str | None
    tracking_uri: str
    experiment: str
    interrupted: bool = False
    trials: list[tuple[str, str, str | None]] = field(default_factory=list)  # (trial id, Tune status, error)
    timings: dict[str, float] = field(default_factory=dict)  # driver phases in seconds (bench)
    report: Any = None

    @property
    def num_errors(self) -> int:
        return sum(1 for _, status, _ in self.trials if status == "ERROR")


def sweep_dir_for(name: str, storage_root: str | os.PathLike = DEFAULT_STORAGE) -> Path:
    return Path(storage_root).expanduser().resolve() / name


def tracking_target(sweep: Sweep) -> tuple[str, str]:
    """(absolute tracking URI, experiment) every trial logs to; grid rows must agree."""
    raws = [sweep.base_raw] if sweep.base_raw is not None else list(sweep.row_raws.values())
    from raymoe.config.load import from_dict
    from raymoe.config.schema import TrackingConfig

    # only the tracking section: the rest of each row was checked by load_sweep (with the row's own overrides)
    tracked = (from_dict(TrackingConfig, raw.get("tracking") or {}, "tracking") for raw in raws)
    targets = {(absolute_tracking_uri(t.uri), t.experiment) for t in tracked}
    if len(targets) > 1:
        raise ConfigError("tracking", sorted(targets), "the grid's presets log to different tracking stores; set "
                                                       "tracking.uri and tracking.experiment in the sweep file")
    return targets.pop()


def _absolute_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Trials run in other working directories: pin data.root (default ./data) and checkpoint paths now."""
    raw = copy.deepcopy(raw)
    data = raw.setdefault("data", {})
    data["root"] = os.path.abspath(os.path.expanduser(data.get("root") or "data"))
    train = raw.setdefault("train", {})
    if train.get("distill_from"):
        train["distill_from"] = os.path.abspath(os.path.expanduser(train["distill_from"]))
    return raw


def check_sweep_dir(sweep: Sweep, sweep_dir: Path, resume: bool) -> None:
    from ray.tune import Tuner

    from raymoe.tracking.sweep_runs import read_state

    if resume:
        if not sweep_dir.exists():
            raise ConfigError("--resume", str(sweep_dir), "no sweep of that name to resume (run without --resume)")
        if not Tuner.can_restore(str(sweep_dir)):
            raise ConfigError("--resume", str(sweep_dir), "the sweep folder holds no Tune state to restore; "
                                                          "remove it or pick another name")
        problem = saved_state_problem(sweep_dir)
        if problem:
            raise ConfigError("--resume", str(sweep_dir), problem)
        state = read_state(sweep_dir)
        if state is not None and state.get("definition") != sweep.digest:
            raise ConfigError("--resume", sweep.path or sweep.name, "the sweep file or its --set overrides changed "
                              "since the sweep started; resume with the same ones, or start a new sweep (--name)")
    elif sweep_dir.exists():
        raise ConfigError("name", sweep_dir.name, f"a sweep of that name exists in {sweep_dir}; pass --resume to "
                                                  f"finish it, or pick another name (--name NEW_NAME)")


def saved_state_problem(sweep_dir: Path) -> str | None:
    """Why the sweep folder's saved state cannot be resumed (None if it looks whole): every pickle (Tune's tuner,
    the searcher) must parse to its STOP opcode and every JSON state must parse. The pickles are read with
    pickletools, which does not execute them; Tune itself unpickles them on resume, so resume only sweep folders
    you made (docs/reliability.md)."""
    import json
    import pickletools

    def files(*patterns: str) -> list[Path]:
        return sorted(p for pattern in patterns for folder in (sweep_dir, *sweep_dir.glob("stage-*"))
                      for p in folder.glob(pattern))

    for path in files("*.pkl", "basic-variant-state-*.json"):  # Tune pickles that one despite its suffix
        try:
            last = None
            for last, _, _ in pickletools.genops(path.read_bytes()):
                pass
            if last is None or last.name != "STOP":
                raise ValueError("no STOP opcode")
        except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
            return (f"{path.name} is corrupt or truncated ({str(exc)[:80]}); the sweep cannot be resumed from it. "
                    f"Start it again under another name (--name), or remove {sweep_dir}")
    for path in files("experiment_state-*.json", "raymoe_sweep.json"):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            return (f"{path.name} is corrupt or truncated ({str(exc)[:80]}); the sweep cannot be resumed from it. "
                    f"Start it again under another name (--name), or remove {sweep_dir}")
    return None


def start_ray(sweep: Sweep, address: str | None) -> tuple[bool, int]:
    """Connect/start Ray, fail fast when a trial cannot fit; returns (started here, default concurrency)."""
    from raymoe.train.ray_session import ensure_ray
    from raymoe.tune.resources import TrialNeed, alive_nodes, check_fits, default_concurrency

    for key, value in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)  # inherited by a local Ray instance's trial and controller processes
    need = TrialNeed.of(sweep.config.resources)
    try:
        started = ensure_ray(address, num_cpus_needed=max(1, int(need.num_workers * need.cpus_per_worker + 0.999)),
                             num_gpus_needed=int(need.gpus + 0.999))
    except ConfigError as exc:
        raise ConfigError("resources", exc.value, exc.problem) from None
    nodes = alive_nodes()
    try:
        check_fits(need, nodes)
    except ConfigError:
        if started:
            import ray

            ray.shutdown()
        raise
    derived = default_concurrency(need, nodes)
    return started, (local_concurrency(derived, need.cpus, physical_cores()) if started else derived)


def local_concurrency(derived: int, cpus_per_trial: float, cores: int) -> int:
    """Trials at once on this machine: a local instance counts at least 4 logical CPUs (ray_session.local_cpus),
    but trials beyond the physical cores only contend for them."""
    return max(1, min(derived, cores // max(1, math.ceil(cpus_per_trial))))


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def trial_label(trial, prefix: str = "") -> str:
    """Tune trial name / folder: `<sweep>-<trial id>`, the trial's run_name (no config values, no dates)."""
    return f"{prefix}{trial.trial_id}"


OPTUNA_DB = "optuna.db"


def optuna_storage_url(sweep_dir: Path) -> str:
    return f"sqlite:///{Path(sweep_dir) / OPTUNA_DB}"


def _tune_config(sweep: Sweep, concurrency: int, sweep_dir: Path):
    import optuna
    import ray.tune
    from ray.tune.search.optuna import OptunaSearch

    from raymoe.config.load import flatten, to_dict
    from raymoe.tune.points import DefineByRun
    from raymoe.tune.searcher import SeedRepeatSearch

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE group/multivariate
    cfg = sweep.config
    names = {"trial_name_creator": functools.partial(trial_label, prefix=f"{sweep.name}-"),
             "trial_dirname_creator": functools.partial(trial_label, prefix="trial-")}
    if cfg.strategy == "grid":
        return ray.tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency, reuse_actors=True, **names)
    metric = cfg.metrics[0] if len(cfg.metrics) == 1 else cfg.metrics
    mode = cfg.modes[0] if len(cfg.modes) == 1 else cfg.modes
    if cfg.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=cfg.sampler_seed)
    elif cfg.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=cfg.sampler_seed)
    else:  # multivariate + group model the conditional space jointly; constant liar spreads parallel suggestions
        sampler = optuna.samplers.TPESampler(seed=cfg.sampler_seed, multivariate=True, group=True,
                                             constant_liar=True, n_startup_trials=min(10, cfg.num_samples))
    space = DefineByRun(sweep.space, flatten(to_dict(sweep.base)))
    # the study in sqlite beside the sweep: optuna.load_study / optuna-dashboard read it (docs/ray-notes.md)
    storage = optuna.storages.RDBStorage(optuna_storage_url(sweep_dir))
    inner = OptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler, study_name=sweep.name,
                         storage=storage, points_to_evaluate=[dict(p) for p in cfg.start_points] or None)
    search = SeedRepeatSearch(inner, cfg.seed_list, metric, mode)
    scheduler = None
    if cfg.scheduler is not None and cfg.scheduler.asha is not None:
        asha = cfg.scheduler.asha
        # max_t one past the last epoch: a trial that survives every rung ends by itself (train_fn closes its
        # MLflow run and logs its figures) instead of being stopped by ASHA at max_t
        scheduler = ray.tune.schedulers.ASHAScheduler(
            metric=metric, mode=mode, time_attr="training_iteration", max_t=asha.max_t or sweep.epochs + 1,
            grace_period=asha.grace_period, reduction_factor=asha.reduction_factor)
    return ray.tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=sweep.num_trials,
                               max_concurrent_trials=concurrency, reuse_actors=True, **names)


def _param_space(sweep: Sweep, points: list) -> dict[str, Any]:
    import ray.tune

    from raymoe.tune.searcher import POINT_KEY

    if sweep.config.strategy == "grid":
        return {POINT_KEY: ray.tune.grid_search([p.as_config() for p in points])}
    return {}


def _trial_states(results) -> list[tuple[str, str, str | None]]:
    out = []
    for trial in results._experiment_analysis.trials:  # ResultGrid has no public per-trial status
        error = None
        if trial.status == "ERROR" and trial.error_file and os.path.isfile(trial.error_file):
            lines = [line for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
            error = lines[-1][:2000] if lines else None
        out.append((trial.trial_id, trial.status, error))
    return out


def run_sweep(sweep: Sweep, *, resume: bool = False, address: str | None = None,
              storage_root: str | os.PathLike = DEFAULT_STORAGE, max_concurrent: int | None = None,
              timing_dir: str | None = None, report_dir: str | os.PathLike | None = None,
              shutdown: bool = True) -> SweepOutcome:
    """Run (or resume) a sweep to the end and write its report; see the module docstring for the order.

    Args:
        sweep: from load_sweep.
        resume: continue the sweep folder of this name (Tuner.restore + the same MLflow parent).
        address: Ray cluster address; None = RAY_ADDRESS or a local instance.
        storage_root: sweeps live in <storage_root>/<name> (made absolute).
        max_concurrent: overrides the sweep's max_concurrent_trials.
        timing_dir: trials write their start/end times there (bench).
        report_dir: where the report files go; default ./reports/<name>.
        shutdown: stop a Ray instance this call started.

    Raises:
        ConfigError: the folder exists without --resume, the store is unwritable, resources cannot fit.
    """
    import ray
    import ray.tune

    from raymoe.tracking import sweep_runs
    from raymoe.tracking.store_check import folder_problem, tracking_problem
    from raymoe.tune.report import build_report
    from raymoe.tune.trial import TrialPlan, run_trial

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    sweep_dir = sweep_dir_for(sweep.name, storage_root)
    check_sweep_dir(sweep, sweep_dir, resume)
    uri, experiment = tracking_target(sweep)
    problem = folder_problem(sweep_dir)
    if problem:
        raise ConfigError("--storage", str(sweep_dir.parent), problem)
    if report_dir is not None and folder_problem(report_dir):
        raise ConfigError("--out", str(report_dir), folder_problem(report_dir))
    problem = tracking_problem(uri)
    if problem:
        raise ConfigError("tracking.uri", uri, problem)
    timings["checks_s"] = time.perf_counter() - t0
    started, derived = start_ray(sweep, address)
    timings["ray_start_s"] = time.perf_counter() - t0 - timings["checks_s"]
    try:
        concurrency = max_concurrent or sweep.config.max_concurrent_trials or derived
        if max_concurrent or sweep.config.max_concurrent_trials:
            chosen = "as asked"
        else:
            fits = f"this machine's {physical_cores()} physical cores" if started else "the cluster"
            chosen = f"what fits {fits}; --max-concurrent to change"
        parent = sweep_runs.open_parent(sweep, uri, experiment, sweep_dir, resume)
        plan = TrialPlan(
            sweep_name=sweep.name, strategy=sweep.config.strategy, parent_run_id=parent.run_id, tracking_uri=uri,
            experiment=experiment, storage_path=str(sweep_dir / "train"),
            base_raw=_absolute_paths(sweep.base_raw) if sweep.base_raw is not None else None,
            applied=[k for k, spec in sweep.space.items() if spec.apply],
            row_raws={k: _absolute_paths(v) for k, v in sweep.row_raws.items()}, seeds=sweep.config.seed_list,
            in_trial=sweep.config.resources.in_trial, timing_dir=timing_dir)
        trainable = _trainable(plan, run_trial, sweep.config.resources)
        timings["setup_s"] = time.perf_counter() - t0 - timings["checks_s"] - timings["ray_start_s"]
        print(f"raymoe tune: sweep {sweep.name}: {sweep.num_trials} trial(s), up to {concurrency} at once "
              f"({chosen}); MLflow parent run {parent.run_id} in {uri} (experiment {experiment!r})", flush=True)
        fit_start = time.perf_counter()
        try:
            trials, interrupted = _fit_stages(sweep, sweep_dir, trainable, concurrency, resume, plan)
        except ConfigError as exc:  # a best_of row whose dependency produced no usable run: later stages not started
            sweep_runs.finish_parent(parent, "FAILED", {"raymoe.failure": str(exc)})
            raise
        timings["fit_s"] = time.perf_counter() - fit_start
        outcome = SweepOutcome(sweep.name, str(sweep_dir), parent.run_id, uri, experiment, trials=trials,
                               timings=timings)
        if interrupted or len(trials) < sweep.num_trials:
            outcome.interrupted = True
            sweep_runs.finish_parent(parent, "KILLED", {"raymoe.interrupted": "true"})
            return outcome
        changed = sweep_runs.reconcile_children(plan, trials)
        if changed["orphaned"]:
            print(f"raymoe tune: removed {changed['orphaned']} MLflow child run(s) of trials the killed driver had "
                  f"started after its last saved state (re-run by this resume; `mlflow runs restore` brings them "
                  f"back)", flush=True)
        end = time.perf_counter()
        outcome.report = build_report(uri, experiment, sweep.name, parent_run_id=parent.run_id,
                                      out_dir=report_dir, log_to_parent=True)
        timings["report_s"] = time.perf_counter() - end
        sweep_runs.finish_parent(parent, "FINISHED")
        return outcome
    finally:
        if started and shutdown:
            ray.shutdown()


def stage_dir_for(sweep_dir: Path, stage: int) -> Path:
    """Tune experiment folder of one stage: the sweep folder itself for stage 0 (every sweep without best_of)."""
    return sweep_dir if stage == 0 else sweep_dir / f"stage-{stage}"


def _fit_stages(sweep: Sweep, sweep_dir: Path, trainable, concurrency: int, resume: bool,
                plan) -> tuple[list[tuple[str, str, str | None]], bool]:
    """Run the sweep's stages in order (one Tune experiment each); returns (trial states, interrupted).

    A grid row with a best_of setting gets it here, from the trials of earlier stages (raymoe.tune.stages)."""
    import ray.tune

    trials: list[tuple[str, str, str | None]] = []
    finished: list[dict[str, Any]] = []  # earlier stages' trials, for best_of
    stages = sorted({p.stage for p in sweep.points}) if sweep.config.strategy == "grid" else [0]
    for stage in stages:
        stage_dir = stage_dir_for(sweep_dir, stage)
        if resume and ray.tune.Tuner.can_restore(str(stage_dir)):
            tuner = ray.tune.Tuner.restore(str(stage_dir), trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
        else:
            points = [p for p in sweep.points if p.stage == stage]
            if stage > 0:
                points = _resolve_references(sweep, points, finished)
                print(f"raymoe tune: stage {stage}: {len(points)} trial(s) of "
                      f"{sorted({p.category for p in points})}", flush=True)
            tuner = ray.tune.Tuner(
                trainable, param_space=_param_space(sweep, points),
                tune_config=_tune_config(sweep, concurrency, sweep_dir),
                run_config=ray.tune.RunConfig(
                    name=stage_dir.name, storage_path=str(stage_dir.parent), verbose=1, stop=_stopper(sweep, plan),
                    failure_config=ray.tune.FailureConfig(max_failures=sweep.config.max_failures, fail_fast=False)))
        results = tuner.fit()
        states = _trial_states(results)
        trials.extend(states)
        if any(status not in ("TERMINATED", "ERROR") for _, status, _ in states):
            return trials, True
        if stage != stages[-1]:  # only later stages read them (best_of)
            finished.extend(_finished_trials(results))
    return trials, False


def _stopper(sweep: Sweep, plan):
    """The routing-collapse stopper of `stop_on`, or None."""
    stop = sweep.config.stop_on
    if stop is None:
        return None
    from raymoe.tune.collapse import CollapseStopper

    return CollapseStopper(stop.metric, stop.above, stop.below, stop.after, plan.tracking_uri, plan.experiment,
                           plan.sweep_name)


def _finished_trials(results) -> list[dict[str, Any]]:
    """category, index, status, last metrics and checkpoint folder of every trial of one stage."""
    from raymoe.tune.searcher import POINT_KEY

    out = []
    for trial in results._experiment_analysis.trials:  # ResultGrid has no public per-trial status
        point = trial.config.get(POINT_KEY, {})
        metrics = trial.last_result or {}
        checkpoint = trial.checkpoint.path if trial.checkpoint is not None else metrics.get("checkpoint_path")
        out.append({"category": point.get("category"), "index": point.get("index", 0), "status": trial.status,
                    "metrics": metrics, "checkpoint": checkpoint})
    return out


def _resolve_references(sweep: Sweep, points: list, finished: list[dict[str, Any]]) -> list:
    """The stage's grid points with every best_of setting replaced by the picked run's value (an absolute path)."""
    from dataclasses import replace

    from raymoe.tune.stages import BestOf, is_reference, pick_best

    from raymoe.tune.points import row_category

    rows = {row_category(r): i for i, r in enumerate(sweep.config.rows)}
    out = []
    for point in points:
        fixed = dict(point.fixed)
        for key, value in point.fixed.items():
            if is_reference(value):
                ref = BestOf(**value)
                best = pick_best(finished, ref, f"rows[{rows[point.category]}].overrides.{key}")
                fixed[key] = os.path.abspath(best["checkpoint"])
        out.append(replace(point, fixed=fixed))
    return out


def _trainable(plan, run_trial, resources):
    import ray.tune

    from raymoe.tune.resources import TrialNeed

    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, plan=plan),
                                   TrialNeed.of(resources).trial_actor())
