"""The one training function: `raymoe train` (in-process), Ray Train workers and Tune trials all call `train_fn`.

Order matters for "bad input never creates a run": the config is rebuilt and checked, the data loaded, the
model built and any checkpoint loaded BEFORE the MLflow run is opened. Everything after that runs inside a
try block that marks the run FAILED (reason in the tag raymoe.failure_reason) on any exception.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymoe.config.load import check_on_this_machine
from raymoe.config.schema import LM_ARCHS, ExperimentConfig, TrainConfig
from raymoe.errors import ConfigError
from raymoe.parallel.context import DistContext
from raymoe.runtime import epoch_seed, pick_device, prepare_process, seed_everything
from raymoe.tracking.mlflow_run import NullRun, TrackedRun
from raymoe.train.run_spec import RunSpec
from raymoe.train.step import EpochResult, StepSettings, TrainingDiverged, post_step_hooks, train_epoch

# Fields of the config that fix the parameter shapes: a checkpoint made with other values cannot be loaded.
ARCH_FIELDS = (("data", "name"), ("model", "arch"), ("model", "num_experts"), ("model", "hidden_size"),
               ("gate", "kind"), ("gate", "hypermoe", "enabled"), ("model", "vit"), ("model", "gpt"))


class CheckpointMismatch(ConfigError):
    """A checkpoint does not fit the model this config builds (exit code 2, like any bad input)."""


def _get(d: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _arch_differences(saved: dict | None, current: dict, fields=ARCH_FIELDS) -> list[str]:
    if not saved:
        return []
    # model.gpt shapes only the language models (checkpoints of image models made before it existed lack it)
    lm = _get(current, ("model", "arch")) in LM_ARCHS
    return [f"{'.'.join(p)}: checkpoint {_get(saved, p)!r} vs config {_get(current, p)!r}"
            for p in fields if _get(saved, p) != _get(current, p) and (lm or p != ("model", "gpt"))]


def make_optimizer(train: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the parameters that train (distillation freezes the experts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # one fused kernel for all parameters instead of ~6 ops per tensor: the optimizer step ~3x faster on CPU
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay, momentum=0.9)


def build_for(cfg: ExperimentConfig, data, device: torch.device, build_args: tuple | None = None) -> nn.Module:
    """The model of this config, or the distilled model when train.distill_from is set (docs/paper-notes.md §1.3 rows 8/9).
    build_args: (classes or vocabulary, in channels, image size); default from an image data set `data`."""
    if cfg.train.distill_from is None:
        from raymoe.models.build import build_model

        model = build_model(cfg, *(build_args or (data.num_classes, data.in_channels, data.image_size)))
    else:
        from raymoe.models.distill import build_distilled
        from raymoe.train.checkpoint import load_full_state

        path = cfg.train.distill_from
        try:
            state_dict, extra = load_full_state(_checkpoint_folder(path))
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointMismatch("train.distill_from", path, f"cannot read a checkpoint there: {exc}") from None
        saved = (extra or {}).get("config")
        if saved is not None:
            fields = (("data", "name"), ("model", "num_experts"), ("model", "hidden_size"))
            diffs = _arch_differences(saved, {"data": {"name": cfg.data.name}, "model": {
                "num_experts": cfg.model.num_experts, "hidden_size": cfg.model.hidden_size}}, fields)
            if _get(saved, ("gate", "kind")) != "attentive":
                diffs.append(f"gate.kind: checkpoint {_get(saved, ('gate', 'kind'))!r}, distillation needs 'attentive'")
            if diffs:
                raise CheckpointMismatch("train.distill_from", path,
                                         "checkpoint is from another architecture (" + "; ".join(diffs) + ")")
        try:
            model = build_distilled(cfg, state_dict, data.num_classes, data.in_channels, data.image_size)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointMismatch("train.distill_from", path,
                                     f"checkpoint does not fit this model: {str(exc).splitlines()[0]}") from None
    from raymoe.kernels.fast_paths import apply_fast_paths

    model = model.to(device)
    apply_fast_paths(model, device)  # from outside, as expert parallelism (raymoe/kernels/fast_paths.py)
    return model


def step_settings(train: TrainConfig, total_steps: int) -> StepSettings:
    """How every optimizer step runs, from train.*: precision, clipping, accumulation, the lr schedule."""
    from functools import partial

    from raymoe.train.schedule import lr_at

    scheduled = train.schedule != "constant" or train.warmup_steps > 0
    return StepSettings(precision=train.precision, grad_clip=train.grad_clip, accum_steps=train.accum_steps,
                        lr_at=partial(lr_at, lr=train.lr, schedule=train.schedule, warmup_steps=train.warmup_steps,
                                      total_steps=total_steps, min_lr_ratio=train.min_lr_ratio) if scheduled else None,
                        error_after_step=train.count_train_error == "after_step")


def initial_model(cfg: ExperimentConfig, build_args: tuple | None = None) -> nn.Module:
    """The model with exactly the initial weights `train_fn` draws for cfg.seed (on the CPU, one process).
    build_args: the workload's (classes, channels, image size); by default an image data set's from its facts
    (a language model's vocabulary comes from its tokenizer: pass (vocab_size, 0, 0))."""
    from raymoe.data.stats import dataset_info
    from raymoe.models.build import build_model

    if build_args is None:
        info = dataset_info(cfg.data.name)
        build_args = (info.num_classes, info.in_channels, info.image_size)
    seed_everything(cfg.seed)
    return build_model(cfg, *build_args)


def _checkpoint_folder(path: str) -> str:
    """A checkpoint folder, or a run's folder of `epoch_XXXX` checkpoints (its latest complete one)."""
    from raymoe.train.checkpoint import is_complete

    if is_complete(path):
        return path
    epochs = sorted(p for p in Path(path).glob("epoch_*") if is_complete(p)) if Path(path).is_dir() else []
    if not epochs:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return str(epochs[-1])


def _resume(reporter, spec: RunSpec, model, optimizer, ctx: DistContext) -> tuple[int, dict, dict]:
    """(epochs already done, their last metrics, the checkpoint's extra) from the latest checkpoint of this run,
    or (0, {}, {})."""
    from raymoe.train.checkpoint import load_checkpoint

    directory = reporter.latest_checkpoint()
    if directory is None:
        return 0, {}, {}
    if spec.fresh:  # start over, except after a restart of this same launch (Ray worker failure)
        from raymoe.train.checkpoint import load_full_state

        _, saved = load_full_state(directory)
        if (saved or {}).get("launch_id") != spec.launch_id:
            return 0, {}, {}
    try:
        extra = load_checkpoint(directory, model=model, optimizer=optimizer, ctx=ctx) or {}
        problem = "; ".join(_arch_differences(extra.get("config"), spec.experiment_dict()))
    except (RuntimeError, KeyError, ValueError) as exc:
        problem = str(exc).splitlines()[0]
    if problem:
        raise CheckpointMismatch("checkpoint", str(directory),
                                 f"cannot resume run {spec.run_name} from it, it is from another "
                                 f"architecture ({problem}); start over with --fresh")
    return int(extra["epoch"]), dict(extra.get("metrics") or {}), extra


def _progress_bar(cfg: ExperimentConfig, ctx: DistContext, label: str, steps: int):
    if not (cfg.train.progress and ctx.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=label, unit="step", leave=False, dynamic_ncols=True)


def epoch_metrics(result: EpochResult, evaluated: dict[str, float], eval_seconds: float) -> dict[str, float]:
    """The metrics of one interval logged to MLflow: training numbers, the workload's evaluation, timing."""
    metrics = {"train_loss": result.loss, "train_error": result.error, **evaluated}
    metrics.update({f"reg_{name}": value for name, value in result.parts.items()})
    if result.grad_norm is not None:
        metrics["grad_norm"] = result.grad_norm
    metrics["lr"] = result.lr
    metrics.update(epoch_seconds=result.seconds + eval_seconds, train_seconds=result.seconds,
                   eval_seconds=eval_seconds, samples_per_s=result.samples / max(result.seconds, 1e-9),
                   targets_per_s=result.targets / max(result.seconds, 1e-9),
                   data_fraction=result.data_seconds / max(result.seconds, 1e-9))
    return metrics


def _summary_line(progress: str, m: dict[str, float]) -> str:
    def f(key: str) -> str:
        value = m.get(key, math.nan)
        return f"{value:.4f}"

    if "val_bits_per_byte" in m:  # language model (image runs report val_loss too)
        return (f"{progress}: train loss {f('train_loss')} | val loss {f('val_loss')} ppl {m['val_perplexity']:.2f} "
                f"bpb {f('val_bits_per_byte')} | H_u {f('usage_entropy_bits')} | {m.get('targets_per_s', 0):.0f} "
                f"tokens/s")
    val = f" | val err {f('val_error')}" if "val_error" in m else ""
    return (f"{progress}: train loss {f('train_loss')} err {f('train_error')}{val} | test err "
            f"{f('test_error')} I(E;Y) {f('mi_pred_bits')} H_s {f('sample_entropy_bits')} "
            f"H_u {f('usage_entropy_bits')} | {m.get('samples_per_s', 0):.0f} samples/s")


def train_fn(spec: RunSpec) -> dict[str, float]:
    """Train one experiment; returns the final epoch's metrics (the same dict on every rank).

    Args:
        spec: from `raymoe.train.run_spec.make_run_spec` (its launcher says where to report).

    Raises:
        ConfigError: bad config, data, or a checkpoint that does not fit (before any MLflow run exists).
        TrainingDiverged: NaN/inf loss (the MLflow run is then FAILED with the message as reason).
    """
    from raymoe.train.checkpoint import save_checkpoint
    from raymoe.train.reporter import make_reporter
    from raymoe.train.workload import make_workload

    cfg, run_name = spec.experiment, spec.run_name
    device = pick_device(cfg.train.device)
    prepare_process(device)  # train_fn is the entry point of every worker and trial (raymoe/runtime.py)
    check_on_this_machine(cfg, device)
    ctx = DistContext.from_env(cfg.scaling.expert_parallel, device)
    say = print if ctx.is_main else (lambda *a, **k: None)

    work = make_workload(cfg, ctx)
    seed_everything(cfg.seed)  # same initial weights on every rank (and as initial_model): replicas start equal
    model = build_for(cfg, work.data, device, work.build_args())
    if ctx.world_size > 1:
        from raymoe.parallel.expert_parallel import apply_expert_parallel

        model = apply_expert_parallel(model, ctx) or model
    optimizer = make_optimizer(cfg.train, model)
    reporter = make_reporter(ctx, spec)
    done, last_metrics, saved = _resume(reporter, spec, model, optimizer, ctx)
    work.restore(saved.get("workload_state") or {})  # e.g. the routing of the last evaluation (stability)
    if done:
        say(f"resuming {run_name} from {work.progress(done).split('/')[0]}", flush=True)

    tracked = NullRun()
    if ctx.is_main and cfg.tracking.enabled:
        from raymoe.tracking.environment import describe_environment

        tracked = TrackedRun.open(spec, describe_environment(device, ctx.world_size))
    monitor = _native_tracking(tracked, cfg, work, spec.tracking_uri)
    try:
        if done and work.mlflow_step(done) > tracked.last_step and last_metrics:  # restart between checkpoint and log
            tracked.log_metrics(last_metrics, work.mlflow_step(done))
        if done >= work.intervals:
            say(f"{run_name} already finished ({work.progress(done)}); its final metrics are reported again",
                flush=True)
            reporter.report(last_metrics, None, done)
            tracked.finish()
            return last_metrics
        hooks = post_step_hooks(model)
        settings = step_settings(cfg.train, work.total_steps)
        matrices: dict = {}
        history: list[dict[str, float]] = []
        for interval in range(done + 1, work.intervals + 1):
            torch.manual_seed(epoch_seed(cfg.seed, interval, ctx.rank))  # gate noise: a resumed run draws the same
            num_samples, batch_size = work.interval_size(interval)
            bar = _progress_bar(cfg, ctx, work.progress(interval), math.ceil(num_samples / batch_size))

            def on_step(step: int, loss: float, accuracy: float, bar=bar) -> None:
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", refresh=False)

            try:
                result = train_epoch(model, optimizer, work.batches(interval), reg_cfg=cfg.regularizer, ctx=ctx,
                                     epoch=interval, num_samples=num_samples, batch_size=batch_size, hooks=hooks,
                                     on_step=on_step if bar is not None else None, settings=settings,
                                     first_step=work.first_step(interval))
            finally:
                if bar is not None:
                    bar.close()
            start = time.perf_counter()
            evaluated, matrices = work.evaluate(model, final=interval == work.intervals)
            metrics = epoch_metrics(result, evaluated, time.perf_counter() - start)
            say(_summary_line(work.progress(interval), metrics), flush=True)
            extra = {"metrics": metrics, "run_name": run_name, "launch_id": spec.launch_id,
                     "config": spec.experiment_dict(), "workload_state": work.state()}
            folder = reporter.staging_dir(interval)
            save_checkpoint(folder, model=model, optimizer=optimizer, epoch=interval, ctx=ctx, extra=extra)
            # MLflow first: a scheduler or stopper may end the trial inside report()
            tracked.log_metrics(metrics, work.mlflow_step(interval))
            reporter.report(metrics, folder, interval)
            history.append({"step": work.mlflow_step(interval), **metrics})
            last_metrics = metrics
            if isinstance(tracked, TrackedRun):  # updated as the run goes
                from raymoe.tracking.figures import routing_figures

                tracked.log_figures(routing_figures(history, cfg.model.num_experts, work.interval_unit))
        if isinstance(tracked, TrackedRun):
            _log_final_artifacts(tracked, matrices, work, getattr(model, "module", model))
            if cfg.tracking.log_model and cfg.scaling.expert_parallel == 1:  # EP shards the experts over ranks
                from raymoe.tracking.native import log_final_model

                example, width = work.model_example()
                log_final_model(spec.tracking_uri, tracked.run_id, getattr(model, "module", model), example, width,
                                spec.experiment_dict())
        tracked.finish()
        return last_metrics
    except TrainingDiverged as exc:
        tracked.fail(str(exc))
        raise
    except KeyboardInterrupt:
        tracked.fail("interrupted (KeyboardInterrupt)", status="KILLED")
        raise
    except SystemExit:  # stopped from outside (e.g. a scheduler); a sweep driver reconciles the status
        tracked.fail("", status="KILLED")
        raise
    except BaseException as exc:
        tracked.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if monitor is not None:
            monitor.stop()


def _native_tracking(tracked, cfg: ExperimentConfig, work, uri: str):
    """Dataset inputs (a new run only) and the system-metrics monitor (returned, stopped by train_fn)."""
    if not isinstance(tracked, TrackedRun):
        return None
    from raymoe.tracking.native import SystemMetrics, log_dataset_inputs

    if not tracked.resumed:
        log_dataset_inputs(tracked.client, tracked.run_id, work.dataset_summary())
    interval = cfg.tracking.system_metrics_s
    return SystemMetrics(tracked.run_id, uri, interval) if interval is not None else None


def _log_final_artifacts(tracked: TrackedRun, matrices: dict, work,
                         model: nn.Module | None = None) -> None:
    """Figures of the final evaluation plus the raw matrices as JSON (for reports)."""
    import numpy as np

    from raymoe.tracking.figures import lm_figures, specialization_figures

    if not matrices:
        return
    one_process = getattr(work.ctx, "world_size", 1) == 1  # one process holds every expert (exemplars)
    if work.kind == "text":
        tracked.log_figures(lm_figures(matrices, work.data.tokenizer))
        tracked.log_dict({k: np.asarray(v).tolist() for k, v in matrices.items()}, "metrics/val_matrices.json")
        if model is not None and one_process:
            tracked.log_text(text_exemplars(model, work), "exemplars/tokens.md")
        return
    tracked.log_figures(specialization_figures(matrices, "test"))
    tracked.log_dict({k: np.asarray(v).tolist() for k, v in matrices.items()}, "metrics/test_matrices.json")
    if model is not None and one_process:
        tracked.log_figures(exemplar_figures(model, work))


def text_exemplars(model: nn.Module, work) -> str:
    """Per MoE layer of a language model: each expert's most routed and highest-weighted validation tokens, in
    context, as Markdown (docs/observatory.md)."""
    from raymoe.tracking.text_exemplars import exemplar_markdown, top_tokens

    data = work.data
    found = top_tokens(model, data.val_x, work.cfg.train.eval_batch_size)
    return exemplar_markdown(data.val_x, found, data.tokenizer,
                             title=f"{work.cfg.name}: what each expert has learned (validation windows)")


def exemplar_figures(model: nn.Module, work) -> dict:
    """Per gate (layer): each expert's 8 highest-weighted test images (docs/observatory.md)."""
    from raymoe.data.batches import eval_batches
    from raymoe.data.stats import dataset_info
    from raymoe.tracking.exemplars import exemplar_figure, top_images

    test = work.data.test
    info = dataset_info(work.data.name)
    found = top_images(model, eval_batches(test, work.cfg.train.eval_batch_size))
    out = {}
    for i, (indices_EN, weights_EN) in enumerate(found):
        name = "figures/exemplars.png" if len(found) == 1 else f"figures/layer{i}/exemplars.png"
        out[name] = exemplar_figure(test.x, indices_EN, weights_EN, info.mean, info.std, test.y,
                                    title=f"{'gate' if len(found) == 1 else f'MoE layer {i}'}: each expert's "
                                          f"highest-weighted test images (gate weight, label)")
    return out
