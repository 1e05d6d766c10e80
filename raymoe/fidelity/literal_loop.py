"""The reference training loop written plainly (docs/paper-notes.md §1.2, §4), as a researcher would write it:
torchvision dataset with per-sample transforms, a shuffling DataLoader, the literal model (literal.py), Adam.

It counts what the reference counts: the epoch's training loss is the mean over batches of the loss before
each step (regularizers included); training accuracy is measured by an EXTRA no-grad forward pass after each
step (and, for comparison with raymoe, also from the step's own forward, before it); test accuracy is the mean
of per-batch accuracies with BatchNorm on batch statistics (the reference never called eval(), docs/paper-notes.md §7.7).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from raymoe.config.schema import ExperimentConfig
from raymoe.fidelity.literal import LiteralMoE
from raymoe.fidelity.side_by_side import literal_for, literal_loss


def _entropy_bits(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def torchvision_sets(cfg: ExperimentConfig, root: Path):
    """(train, test) torchvision datasets with the reference transforms (ToTensor, Normalize; no augmentation
    outside CIFAR-100), read from wherever raymoe finds the files (data.root, the system copy, a download)."""
    import torchvision
    from torchvision import transforms

    from raymoe.data import sources
    from raymoe.data.stats import dataset_info

    info = dataset_info(cfg.data.name)
    tv_root = sources.torchvision_root(sources.check_available(cfg.data), cfg.data.name, root)
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[cfg.data.name]
    plain = [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    augment = [transforms.RandomHorizontalFlip(), transforms.RandomCrop(32, padding=4, padding_mode="reflect")]
    use_aug = cfg.data.augment if cfg.data.augment is not None else cfg.data.name == "cifar100"
    train = cls(str(tv_root), train=True, download=False,
                transform=transforms.Compose((augment if use_aug else []) + plain))
    test = cls(str(tv_root), train=False, download=False, transform=transforms.Compose(plain))
    if cfg.data.train_limit is not None:
        train = torch.utils.data.Subset(train, range(min(cfg.data.train_limit, len(train))))
    if cfg.data.test_limit is not None:
        test = torch.utils.data.Subset(test, range(min(cfg.data.test_limit, len(test))))
    return train, test, info.num_classes


def distill_into(model: LiteralMoE, attentive: LiteralMoE) -> LiteralMoE:
    """Rows 8/9 as the reference's train_from_model (docs/paper-notes.md §1.3): the attentive model's experts copied
    and frozen, its gate's conv/fc1/fc2 loaded into the new original gate with strict=False (out stays random)."""
    if model.attention is not None or attentive.attention is None:
        raise ValueError("distillation goes from an attentive-gate MoE into an original-gate MoE")
    model.experts.load_state_dict(attentive.experts.state_dict())
    model.experts.requires_grad_(False)
    model.gate.load_state_dict(attentive.gate.state_dict(), strict=False)
    return model


class LiteralLoop:
    """The literal model of a paper preset, its Adam and its DataLoaders (the reference loop, module docstring)."""

    def __init__(self, cfg: ExperimentConfig, root: Path, init: str = "literal",
                 distill_from: LiteralMoE | None = None):
        """init: "literal" draws the literal model's weights with cfg.seed; "raymoe" starts from exactly the
        weights `raymoe train` draws for cfg.seed (raymoe.train.loop.initial_model).
        distill_from: a trained attentive literal MoE; the new original-gate model takes its experts (frozen) and
        gate trunk (distill_into), and only the gate trains."""
        train_set, test_set, num_classes = torchvision_sets(cfg, root)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = literal_for(cfg, num_classes)
        if distill_from is not None:
            if init != "literal":
                raise ValueError("a distilled model starts from its attentive model, not from raymoe's weights")
            distill_into(self.model, distill_from)
        elif init == "raymoe":
            from raymoe.fidelity.transfer import load_raymoe_into
            from raymoe.train.loop import initial_model

            load_raymoe_into(self.model, initial_model(cfg))
        elif init != "literal":
            raise ValueError(f"init must be 'literal' or 'raymoe', not {init!r}")
        torch.manual_seed(cfg.seed)  # the DataLoader's shuffling draws from here on, whichever init
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True)
        self.test_loader = torch.utils.data.DataLoader(test_set, batch_size=cfg.train.eval_batch_size, shuffle=True)

    def train_epoch(self, max_steps: int | None = None) -> dict[str, float]:
        """One epoch (or its first `max_steps` steps): train_loss, train_error (extra pass after each step),
        train_error_before_step, train_seconds, steps, samples."""
        self.model.train()
        loss_sum = acc_after = acc_before = 0.0
        steps = samples = 0
        start = time.perf_counter()
        for x, y in self.train_loader:
            loss, mixture_BC = literal_loss(self.cfg, self.model, x, y)
            acc_before += float((mixture_BC.detach().argmax(1) == y).float().mean())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += float(loss.detach())
            with torch.no_grad():
                acc_after += float((self.model(x).argmax(1) == y).float().mean())
            steps, samples = steps + 1, samples + len(y)
            if max_steps is not None and steps >= max_steps:
                break
        return {"train_loss": loss_sum / steps, "train_error": 1 - acc_after / steps,
                "train_error_before_step": 1 - acc_before / steps, "train_seconds": time.perf_counter() - start,
                "steps": steps, "samples": samples}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """test_error (mean of per-batch errors, BatchNorm on batch statistics as the reference), sample_entropy_bits
        and usage_entropy_bits (H_s, H_u over the whole test set), eval_seconds."""
        start = time.perf_counter()
        accuracy, batches, gate_probs = 0.0, 0, []
        for x, y in self.test_loader:  # still in train mode, as the reference
            accuracy += float((self.model(x).argmax(1) == y).float().mean())
            batches += 1
            if isinstance(self.model, LiteralMoE):
                gate_probs.append(self.model.gate_probs)
        metrics = {"test_error": 1 - accuracy / batches}
        if gate_probs:
            p_NE = torch.cat(gate_probs)
            metrics["usage_entropy_bits"] = _entropy_bits(p_NE.mean(0))
            metrics["sample_entropy_bits"] = float(-(p_NE * p_NE.clamp_min(1e-30).log2()).sum(1).mean())
        metrics["eval_seconds"] = time.perf_counter() - start
        return metrics
