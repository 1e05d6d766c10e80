"""What `train_fn` trains on: image classification by epochs, or language modelling by a step budget.

Both give the loop the same shape: `intervals` of optimizer steps (an epoch of images, or train.eval_every steps
of text), each followed by an evaluation, a checkpoint and one MLflow step. The loop itself (raymoe/train/loop.py)
does not know which one it runs.
Shape legend: B samples (images or windows), T = block size, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from raymoe.config.schema import LM_ARCHS, ExperimentConfig
from raymoe.errors import ConfigError
from raymoe.parallel.context import DistContext
from raymoe.runtime import epoch_seed


STABILITY_ITEMS = 2048  # items (images, or tokens of the first images) compared between evaluations


class RoutingStability:
    """Top-1 experts of a fixed set of evaluation items at the previous evaluation; each update returns the churn
    and the adjusted mutual information since then (docs/observatory.md), per layer for token-level models."""

    def __init__(self, per_layer: bool = False):
        self.previous: list | None = None
        self.per_layer = per_layer  # layer{i}/ keys even for one layer (the language models name every layer)

    def update(self, top1: list) -> dict[str, float]:
        from raymoe.metrics.stability import adjusted_mutual_information, churn

        previous, self.previous = self.previous, top1
        if not top1 or previous is None or len(previous) != len(top1):
            return {}
        pairs = [(p, c) for p, c in zip(previous, top1) if len(p) == len(c) and len(c)]
        if len(pairs) != len(top1):
            return {}
        churns = [churn(p, c) for p, c in pairs]
        amis = [adjusted_mutual_information(p, c) for p, c in pairs]
        out = {"routing_churn": float(sum(churns) / len(churns)), "routing_ami": float(sum(amis) / len(amis))}
        if len(pairs) > 1 or self.per_layer:
            for i, (ch, ami) in enumerate(zip(churns, amis)):
                out.update({f"layer{i}/routing_churn": ch, f"layer{i}/routing_ami": ami})
        return out

    def state(self) -> dict:
        return {"routing_top1": [a.tolist() for a in self.previous]} if self.previous else {}

    def restore(self, state: dict) -> None:
        import numpy as np

        if state.get("routing_top1"):
            self.previous = [np.asarray(a, dtype=np.int64) for a in state["routing_top1"]]


class _ResumableRouting:
    """What a resumed run of either workload needs besides the weights: the last evaluation's routing."""

    stability: RoutingStability

    def state(self) -> dict:
        return self.stability.state()

    def restore(self, state: dict) -> None:
        self.stability.restore(state)


class ImageWorkload(_ResumableRouting):
    """The paper's data sets and the ViT: one interval = one epoch over the training set (MLflow step = epoch)."""

    kind = "image"
    interval_unit = "epoch"

    def __init__(self, cfg: ExperimentConfig, ctx: DistContext):
        from raymoe.data.datasets import load_dataset

        self.cfg, self.ctx = cfg, ctx
        self.data = load_dataset(cfg.data, ctx.device)
        self.num_train = len(self.data.train.y)
        self.steps_per_interval = math.ceil(self.num_train / cfg.train.batch_size)
        self.intervals = cfg.train.epochs
        self.total_steps = self.intervals * self.steps_per_interval
        self.stability = RoutingStability()

    def build_args(self) -> tuple:
        return self.data.num_classes, self.data.in_channels, self.data.image_size

    def first_step(self, interval: int) -> int:
        return (interval - 1) * self.steps_per_interval

    def interval_size(self, interval: int) -> tuple[int, int]:
        """(samples in the interval over all ranks, global batch size)."""
        return self.num_train, self.cfg.train.batch_size

    def mlflow_step(self, interval: int) -> int:
        return interval

    def batches(self, interval: int) -> Iterator:
        from raymoe.data.batches import train_batches

        # data order and augmentation depend only on (seed, epoch): a resumed run is bit-identical
        generator = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, interval))
        return train_batches(self.data.train, self.cfg.train.batch_size, generator=generator,
                             augment=self.data.augment, rank=self.ctx.rank, world_size=self.ctx.world_size)

    def evaluate(self, model: nn.Module, final: bool) -> tuple[dict[str, float], dict]:
        """Test-set metrics (the paper's protocol), val_error / val_loss when a validation split is held out,
        routing stability since the previous evaluation, and the matrices for the figures."""
        test, accumulator = self._evaluate(model, self.data.test, keep_items=STABILITY_ITEMS)
        val = self._evaluate(model, self.data.val)[0] if self.data.val is not None else None
        metrics = image_metric_names(test, val)
        metrics.update(self.stability.update(accumulator.first_top1()))
        return metrics, accumulator.matrices()

    def _evaluate(self, model: nn.Module, split, keep_items: int = 0) -> tuple[dict[str, float], object]:
        from raymoe.data.batches import eval_batches
        from raymoe.train.step import evaluate

        cfg = self.cfg
        return evaluate(model, eval_batches(split, cfg.train.eval_batch_size, rank=self.ctx.rank,
                                            world_size=self.ctx.world_size),
                        ctx=self.ctx, num_experts=cfg.model.num_experts, num_classes=self.data.num_classes,
                        bn_eval=cfg.train.bn_eval, keep_items=keep_items)

    def progress(self, interval: int) -> str:
        return f"epoch {interval}/{self.intervals}"

    def dataset_summary(self):
        from raymoe.tracking.native import DatasetSummary, tensor_digest

        d = self.data
        splits = {"train": len(d.train), **({"val": len(d.val)} if d.val is not None else {}), "test": len(d.test)}
        return DatasetSummary(d.name, d.source, splits,
                              tensor_digest(d.train.y, d.val.y if d.val is not None else None, d.test.y))

    def model_example(self) -> tuple[torch.Tensor, int]:
        """(two test inputs, output width) for the logged model's signature."""
        return self.data.test.x[:2], self.data.num_classes


class TextWorkload(_ResumableRouting):
    """Language modelling: random windows sampled on the device; one interval = train.eval_every optimizer steps,
    then the fixed validation windows are scored (MLflow step = optimizer steps done)."""

    kind = "text"
    interval_unit = "optimizer step"

    def __init__(self, cfg: ExperimentConfig, ctx: DistContext):
        from raymoe.data.text.dataset import load_text_dataset

        self.cfg, self.ctx = cfg, ctx
        t = cfg.train
        self.data = load_text_dataset(cfg.data, ctx.device)
        self.tokens_per_step = t.batch_size * self.data.block_size
        if t.max_steps is not None:
            self.total_steps = t.max_steps
        elif t.tokens is not None:
            self.total_steps = max(1, math.ceil(t.tokens / self.tokens_per_step))
        else:
            raise ConfigError("train.max_steps", None, "a language model trains for a step budget: set "
                              "train.max_steps or train.tokens")
        self.steps_per_interval = min(t.eval_every, self.total_steps)
        self.intervals = math.ceil(self.total_steps / self.steps_per_interval)
        self.num_train = self.data.train.numel()
        self.stability = RoutingStability(per_layer=True)

    def build_args(self) -> tuple:
        return self.data.vocab_size, 0, 0  # build_model(cfg, vocabulary, -, -)

    def first_step(self, interval: int) -> int:
        return (interval - 1) * self.steps_per_interval

    def _steps_in(self, interval: int) -> int:
        return min(self.steps_per_interval, self.total_steps - self.first_step(interval))

    def interval_size(self, interval: int) -> tuple[int, int]:
        b = self.cfg.train.batch_size
        return self._steps_in(interval) * b, b

    def mlflow_step(self, interval: int) -> int:
        return self.first_step(interval) + self._steps_in(interval)

    def batches(self, interval: int) -> Iterator:
        from raymoe.data.text.windows import sample_windows

        device = self.data.train.device
        generator = torch.Generator(device=device).manual_seed(epoch_seed(self.cfg.seed, interval))
        for _ in range(self._steps_in(interval)):
            yield sample_windows(self.data.train, self.data.block_size, self.cfg.train.batch_size, generator,
                                 rank=self.ctx.rank, world_size=self.ctx.world_size)

    @torch.no_grad()
    def _score(self, model: nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor, split: str, keep_items: int = 0):
        from raymoe.data.text.dataset import bits_per_byte
        from raymoe.metrics.lm import LanguageModelAccumulator
        from raymoe.train.precision import autocast

        ctx, cfg = self.ctx, self.cfg
        model.eval()
        acc = LanguageModelAccumulator(self.data.vocab_size, self.data.block_size, keep_items)
        part = torch.tensor_split(torch.arange(len(x_BT)), ctx.world_size)[ctx.rank]
        for chunk in torch.split(part, cfg.train.eval_batch_size):
            if len(chunk):
                idx = chunk.to(x_BT.device)
                with autocast(ctx.device, cfg.train.precision):
                    acc.update(model(x_BT[idx]), x_BT[idx], y_BT[idx])
        acc.reduce(ctx)
        metrics = acc.compute(bytes_per_token=1.0)
        nll_sum = metrics["loss"] * y_BT.numel()
        metrics["bits_per_byte"] = bits_per_byte(nll_sum, self.data.target_bytes(y_BT, split))
        return metrics, acc

    def evaluate(self, model: nn.Module, final: bool) -> tuple[dict[str, float], dict]:
        """Validation-window metrics every interval ("val_*", routing per layer, routing stability since the
        previous evaluation); the test split at the end."""
        from raymoe.data.text.windows import eval_windows

        val, acc = self._score(model, self.data.val_x, self.data.val_y, "val", keep_items=STABILITY_ITEMS)
        test = None
        if final and self.data.test is not None:
            x, y = eval_windows(self.data.test, self.data.block_size, self.cfg.data.text.val_tokens)
            test, _ = self._score(model, x, y, "test")
        metrics = lm_metric_names(val, test)
        metrics.update(self.stability.update(acc.first_top1()))
        return metrics, acc.matrices()

    def progress(self, interval: int) -> str:
        return f"step {self.mlflow_step(interval)}/{self.total_steps}"

    def dataset_summary(self):
        from raymoe.tracking.native import DatasetSummary, tensor_digest

        d = self.data
        parts = {"train": d.train, "val": d.val, **({"test": d.test} if d.test is not None else {})}
        # a strided sample of at most ~1M ids per split: nanoGPT shards can hold billions of tokens
        sample = [t[:: max(1, t.numel() // 1_000_000)] for t in parts.values()]
        return DatasetSummary(d.name, d.source, {k: int(t.numel()) for k, t in parts.items()},
                              tensor_digest(torch.tensor([t.numel() for t in parts.values()]), *sample))

    def model_example(self) -> tuple[torch.Tensor, int]:
        return self.data.val_x[:2], self.data.vocab_size


def image_metric_names(test: dict[str, float], val: dict[str, float] | None = None) -> dict[str, float]:
    """Evaluation keys as logged: error and loss become test_error and test_loss (and val_error, val_loss from the
    validation split); the specialization metrics are the test set's."""
    out = {(f"test_{k}" if k in ("error", "loss") else k): v for k, v in test.items()}
    if val is not None:
        out.update(val_error=val["error"], val_loss=val["loss"])
    return out


LM_SPLIT_KEYS = ("loss", "perplexity", "bits_per_byte", "error")


def lm_metric_names(val: dict[str, float], test: dict[str, float] | None = None) -> dict[str, float]:
    """Validation keys as logged: val_loss, val_perplexity, val_bits_per_byte, val_error, routing keys as they are;
    and at the end test_loss, test_perplexity, test_bits_per_byte."""
    out = {(f"val_{k}" if k in LM_SPLIT_KEYS else k): v for k, v in val.items()}
    if test is not None:
        out.update({f"test_{k}": test[k] for k in LM_SPLIT_KEYS[:3]})
    return out


def make_workload(cfg: ExperimentConfig, ctx: DistContext):
    return TextWorkload(cfg, ctx) if cfg.model.arch in LM_ARCHS else ImageWorkload(cfg, ctx)
