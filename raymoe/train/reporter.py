"""Where a training run's per-epoch checkpoints and metrics go: Ray Train, or folders on this machine.

Both reporters give the same layout, `<root>/<run_name>/epoch_XXXX/` holding the files of
raymoe.train.checkpoint, so load_checkpoint reads either. Under Ray the root is RunConfig.storage_path
(Ray merges every rank's folder into one); locally it is RunSpec.checkpoint_root.

Usage in the training loop (every rank):
    reporter = make_reporter(ctx, spec)
    start = reporter.latest_checkpoint()            # folder to resume from, or None
    ...
    folder = reporter.staging_dir(epoch)
    save_checkpoint(folder, model=..., optimizer=..., epoch=epoch, ctx=ctx, extra=...)
    reporter.report(metrics, folder, epoch)          # every rank, once per epoch (a barrier under Ray)
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from raymoe.parallel.context import DistContext
from raymoe.train.checkpoint import is_complete
from raymoe.train.run_spec import RunSpec

KEEP_LAST = 2  # same as the Ray CheckpointConfig(num_to_keep=2) built in ray_launch
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


def epoch_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


class Reporter(Protocol):
    def latest_checkpoint(self) -> str | None: ...

    def staging_dir(self, epoch: int) -> str: ...

    def report(self, metrics: dict, checkpoint_dir: str | None, epoch: int) -> None: ...


class LocalReporter:
    """In-process run: checkpoints live under checkpoint_root/run_name/epoch_XXXX; the last KEEP_LAST are kept."""

    def __init__(self, run_root: str | os.PathLike, keep: int = KEEP_LAST):
        self.run_root, self.keep = Path(run_root).absolute(), keep

    def _complete_epochs(self) -> list[tuple[int, Path]]:
        if not self.run_root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.run_root.iterdir()
                 if (m := _EPOCH_DIR.match(p.name)) and is_complete(p)]
        return sorted(found)

    def latest_checkpoint(self) -> str | None:
        found = self._complete_epochs()
        return str(found[-1][1]) if found else None

    def staging_dir(self, epoch: int) -> str:
        path = self.run_root / f".staging-{epoch_dir_name(epoch)}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return str(path)

    def report(self, metrics: dict, checkpoint_dir: str | None, epoch: int) -> None:
        if checkpoint_dir is None:
            return
        dest = self.run_root / epoch_dir_name(epoch)
        if Path(checkpoint_dir).absolute() != dest:
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(checkpoint_dir), dest)
        for _, old in self._complete_epochs()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _local_folder(checkpoint) -> str | None:
    """A Ray checkpoint as a folder on this machine: read in place from local storage (or NFS), else downloaded."""
    if checkpoint is None:
        return None
    if checkpoint.filesystem.type_name == "local" and os.path.isdir(checkpoint.path):
        return checkpoint.path
    return checkpoint.to_directory(tempfile.mkdtemp(prefix="raymoe-resume-"))


class _TempStaging:
    """Epoch folders staged in a temp dir; Ray copies them to the run's storage when they are reported."""

    def staging_dir(self, epoch: int) -> str:
        return tempfile.mkdtemp(prefix=f"raymoe-{epoch_dir_name(epoch)}-")


class RayReporter(_TempStaging):
    """Ray Train worker: ray.train.report from every rank (a barrier); ranks that wrote files attach them."""

    def __init__(self, rank: int = 0):
        self.rank = rank

    def latest_checkpoint(self) -> str | None:
        import ray.train

        return _local_folder(ray.train.get_checkpoint())

    def report(self, metrics: dict, checkpoint_dir: str | None, epoch: int) -> None:
        import ray.train

        has_files = checkpoint_dir is not None and any(Path(checkpoint_dir).iterdir())
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if has_files else None
        try:
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=epoch_dir_name(epoch))
        finally:
            if checkpoint_dir is not None and Path(checkpoint_dir).name.startswith("raymoe-epoch_"):
                shutil.rmtree(checkpoint_dir, ignore_errors=True)  # our staging copy; storage has it now


class TuneReporter(_TempStaging):
    """Inside a Tune trial that trains in its own process (one worker, no Ray Train): ray.tune.report with the
    epoch's folder as a Tune checkpoint; Tune restores the latest one on resume and after a trial failure."""

    def latest_checkpoint(self) -> str | None:
        import ray.tune

        return _local_folder(ray.tune.get_checkpoint())

    def report(self, metrics: dict, checkpoint_dir: str | None, epoch: int) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
        try:
            ray.tune.report(metrics, checkpoint=checkpoint)
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)  # Tune copied it to the trial's storage


def make_reporter(ctx: DistContext, spec: RunSpec) -> Reporter:
    """By spec.launcher: Ray's reporter inside a Ray Train worker (set by build_trainer), Tune's inside a trial
    that trains in its own process, else local folders under spec.checkpoint_root / spec.run_name."""
    if spec.launcher == "ray_train":
        return RayReporter(ctx.rank)
    if spec.launcher == "in_trial":
        return TuneReporter()
    if ctx.distributed:
        raise ValueError("a multi-process run outside Ray Train has no reporter; launch it through build_trainer")
    return LocalReporter(Path(spec.checkpoint_root) / spec.run_name)
