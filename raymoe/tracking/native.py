"""MLflow's own objects for a run, so its UI fills the Dataset and Model columns: dataset inputs, the final model
(mlflow.pytorch, with a signature and the resolved config), system metrics (CPU, memory, GPU where present)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from raymoe.tracking.mlflow_run import _retry


@dataclass(frozen=True)
class DatasetSummary:
    """What a run trained and was judged on: logged as one MLflow dataset input per split."""

    name: str  # e.g. fashion_mnist, text
    source: str  # where the files came from
    splits: dict[str, int]  # split -> samples (images) or tokens (text)
    digest: str  # sha256 over the splits' labels or token ids (first 16 hex digits)


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """sha256 over the bytes of the given tensors (labels or token ids: they fix membership and order)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def log_dataset_inputs(client, run_id: str, summary: DatasetSummary) -> None:
    """One DatasetInput per split (context = the split), with name, source, digest and the split's size."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for split, size in summary.splits.items():
        profile = json.dumps({"split": split, "num_rows": size, "all_splits": summary.splits})
        dataset = Dataset(name=f"{summary.name}-{split}", digest=summary.digest, source_type="local",
                          source=summary.source, profile=profile)
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)]))
    _retry(client.log_inputs, run_id, datasets=inputs)


def log_final_model(uri: str, run_id: str, model: torch.nn.Module, example: torch.Tensor, output_width: int,
                    config: dict[str, Any]) -> None:
    """The trained model with mlflow.pytorch (it loads back with mlflow.pytorch.load_model), linked to the run:
    a tensor signature (the model returns a typed result, so it is given, not inferred), the resolved config as
    metadata, and the pinned requirements instead of a slow environment scan."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    dtype = np.float32 if example.is_floating_point() else np.int64
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(dtype), (-1, *example.shape[1:]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, output_width))]))
    mlflow.set_tracking_uri(uri)
    was_training = model.training
    model.eval()
    try:
        # the run as the active run, so the LoggedModel lands in the run's experiment (not "Default") and is linked;
        # pickle, not the traced pt2 format: the model returns a typed result, not a tensor
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(model, name="model", signature=signature, serialization_format="pickle",
                                     metadata={"raymoe_config": config},
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "raymoe"])
    finally:
        model.train(was_training)


class SystemMetrics:
    """MLflow's system-metrics monitor on a run (CPU, memory, disk, network; GPU when pynvml sees one), sampled
    every `interval_s` seconds in a background thread; a no-op where the monitor cannot start."""

    def __init__(self, run_id: str, uri: str, interval_s: float = 10.0):
        self.monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                                tracking_uri=uri)
            self.monitor.start()
        except Exception:  # noqa: BLE001 - monitoring must never stop training
            self.monitor = None

    def stop(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:  # noqa: BLE001
                pass
