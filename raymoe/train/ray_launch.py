"""Run the one training function (raymoe.train.loop.train_fn) on Ray Train workers (Train V2 API).

Re-running the same run name with the same storage resumes it: Train V2 reloads the checkpoint-manager snapshot
under storage_path/run_name and get_checkpoint() hands the latest checkpoint to the workers.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from raymoe.config.schema import ExperimentConfig
from raymoe.errors import ConfigError
from raymoe.train.run_spec import RunSpec

_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")
SNAPSHOT = "checkpoint_manager_snapshot.json"


def storage_uri(cfg: ExperimentConfig) -> str:
    """scaling.storage_path as Ray wants it: a URI (s3://, gs://) as is, a local path made absolute."""
    path = cfg.scaling.storage_path or "ray_results"
    return path if "://" in path else str(Path(path).expanduser().absolute())


def existing_run_epoch(storage: str, run_name: str) -> int | None:
    """Epoch of the newest checkpoint of an existing run under storage/run_name (0 if none yet), None if no run."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    if fs.get_file_info(f"{run_dir}/{SNAPSHOT}").type == pyarrow.fs.FileType.NotFound:
        return None
    entries = fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True))
    epochs = [int(m.group(1)) for e in entries if (m := _EPOCH_DIR.match(e.base_name))]
    return max(epochs, default=0)


def worker_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Ray resources of one Train worker: scaling.cpus_per_worker, and scaling.gpus_per_worker (default 1) with
    use_gpu; a fraction packs several small runs (sweep trials) on one GPU."""
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1.0 if s.gpus_per_worker is None else s.gpus_per_worker
    return resources


def _worker_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the worker function on the run's spec (Train passes one dict)."""
    config["worker"](config["spec"])


def build_trainer(spec: RunSpec, *, callbacks: Sequence = (), worker: Callable[[RunSpec], Any] | None = None):
    """A TorchTrainer running `worker(spec)` (default train_fn) on scaling.num_workers workers (at least 1); the
    workers see the spec launched by "ray_train", so the loop reports through Ray.

    Args:
        spec: the run (its experiment's scaling.* and storage size the trainer).
        callbacks: Ray Train UserCallbacks (e.g. Tune's TuneReportCallback inside a trial).
        worker: the function every worker runs (tests wrap train_fn, e.g. to make a rank fail).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raymoe.train.loop import train_fn

    cfg = spec.experiment
    s = cfg.scaling
    run_config = ray.train.RunConfig(
        name=spec.run_name,
        storage_path=storage_uri(cfg),
        failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        callbacks=list(callbacks),
    )
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"spec": spec.launched_by("ray_train"), "worker": worker or train_fn},
        scaling_config=ray.train.ScalingConfig(num_workers=max(1, s.num_workers), use_gpu=s.use_gpu,
                                               resources_per_worker=worker_resources(cfg)),
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
    )


def run_on_ray(spec: RunSpec, *, address: str | None = None, worker: Callable[[RunSpec], Any] | None = None
               ) -> dict:
    """Train on Ray workers and return the final metrics (rank 0's last report).

    Starts local Ray when no address/RAY_ADDRESS is given (and shuts it down afterwards), says whether the run
    resumes, and turns a failed run into RuntimeError carrying the workers' tracebacks.

    Raises:
        ConfigError: unreachable address, or not enough CPUs/GPUs (nothing is started).
        RuntimeError: the run failed after scaling.max_failures restarts.
    """
    import ray
    from ray.train import TrainingFailedError

    from raymoe.train.ray_session import ensure_ray

    cfg = spec.experiment
    s = cfg.scaling
    workers = max(1, s.num_workers)
    per_worker = worker_resources(cfg)
    started = ensure_ray(address, num_cpus_needed=math.ceil(workers * per_worker["CPU"]),
                         num_gpus_needed=math.ceil(workers * per_worker.get("GPU", 0.0)))
    name = spec.run_name
    try:
        storage = storage_uri(cfg)
        try:
            previous = existing_run_epoch(storage, name)
        except Exception:  # noqa: BLE001 - e.g. no credentials for s3:// here; Ray Train reports storage errors
            previous = -1
        where = f"{storage}/{name}"
        if previous == -1:
            print(f"raymoe: starting or resuming run {name} (storage {where})", flush=True)
        elif previous is None:
            print(f"raymoe: starting run {name} on {workers} Ray Train worker(s) (storage {where})", flush=True)
        else:
            print(f"raymoe: resuming run {name} from epoch {previous} (storage {where})", flush=True)
        trainer = build_trainer(spec, worker=worker)
        try:
            result = trainer.fit()
            if result.error is not None:
                raise result.error
        except TrainingFailedError as exc:
            _mark_mlflow_failed(spec, f"Ray Train workers failed: {_last_error_line(str(exc))}")
            config_error = config_error_in(exc)
            if config_error is not None:  # the same one line and exit 2 as in one process (docs/reliability.md)
                raise config_error from None
            raise RuntimeError(f"Ray Train run {name} failed (scaling.max_failures = {s.max_failures} restart(s) "
                               f"used up):\n{exc}") from None
        return dict(result.metrics or {})
    finally:
        if started:
            ray.shutdown()



def config_error_in(exc: BaseException) -> ConfigError | None:
    """The ConfigError (bad config or data, e.g. a checkpoint that does not fit) a worker raised, if that is why
    the run failed: found in Ray Train's per-rank failures, their causes, or the traceback text."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, ConfigError):
            return error
        stack.extend(getattr(error, "worker_failures", {}).values())
        stack.extend([error.__cause__, error.__context__, getattr(error, "cause", None)])
    match = re.search(r"raymoe\.\w+(?:\.\w+)*\.(?:ConfigError|DataError|CheckpointMismatch): (.+)", str(exc))
    return ConfigError("", None, match.group(1).strip()) if match else None


def _last_error_line(text: str) -> str:
    """The last `SomeError: message` line of a worker traceback (the reason worth a tag), else the first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)]
    return (errors[-1] if errors else lines[0] if lines else "unknown error")[:500]


def _mark_mlflow_failed(spec: RunSpec, reason: str) -> None:
    """Mark the run's MLflow run FAILED from the driver: a killed rank-0 worker cannot do it itself, and rank 0
    may have finished cleanly while another rank failed."""
    tracking = spec.experiment.tracking
    if not tracking.enabled:
        return
    try:
        from mlflow.entities import RunStatus

        from raymoe.tracking.mlflow_run import FAILURE_TAG, client_for, find_runs

        client = client_for(tracking.uri)
        experiment = client.get_experiment_by_name(tracking.experiment)
        runs = find_runs(client, experiment.experiment_id, spec.run_name) if experiment else []
        for run in runs[:1]:  # rank 0 may have finished its part (FINISHED) while another rank failed for good
            if run.info.status != RunStatus.to_string(RunStatus.FAILED):
                client.set_tag(run.info.run_id, FAILURE_TAG, reason)
                client.set_terminated(run.info.run_id, "FAILED")
    except Exception:  # noqa: BLE001 - best effort; the RuntimeError below is what the user sees
        pass
