"""Load a whole data set into device tensors once: normalised float32 images and int64 labels.

Both splits of these data sets fit in memory (CIFAR-100 train: 50,000 x 3 x 32 x 32 float32 = 614 MB), so the
training loop indexes device tensors instead of running a DataLoader: no per-sample transforms, no workers.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from raymoe.data import sources
from raymoe.data.readers import read_split
from raymoe.data.stats import AUGMENTED_BY_DEFAULT, dataset_info


@dataclass
class Split:
    """One split on the device: x float32 (N, C, H, W) normalised with the paper's mean/std, y int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DeviceDataset:
    """Both splits plus what the model builder needs."""

    name: str  # config data.name
    train: Split
    test: Split
    val: Split | None  # held out of the training files (data.val_fraction); None = the paper's protocol
    num_classes: int
    in_channels: int
    image_size: int
    source: str  # where the files came from, for logs and MLflow
    augment: bool  # data.augment resolved (None -> on for cifar100 only, as in the paper)


def normalize(x_u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
              device: torch.device) -> torch.Tensor:
    """(x / 255 - mean) / std per channel in float32, computed on `device` (uint8 travels, 4x less to copy)."""
    x = x_u8.to(device).to(torch.float32).div_(255.0)
    mean_Z = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_Z = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return x.sub_(mean_Z).div_(std_Z)


VAL_SPLIT_SEED = 20230101  # one draw for every run and seed: runs are compared on the same validation images


def stratified_holdout(y: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), both sorted: round(fraction * n_c) random samples of each class c.

    The draw depends only on the labels and VAL_SPLIT_SEED, never on the run's seed."""
    generator = torch.Generator().manual_seed(VAL_SPLIT_SEED)
    held = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        take = int(round(fraction * len(members)))
        held.append(members[torch.randperm(len(members), generator=generator)[:take]])
    held_i = torch.sort(torch.cat(held)).values
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[held_i] = False
    return torch.nonzero(mask).flatten(), held_i


def load_dataset(cfg, device: torch.device) -> DeviceDataset:
    """Find, parse (with torchvision's classes), cut to the limits, normalise and move a data set to `device`.

    Args:
        cfg: the DataConfig (name, root, train_limit, test_limit, augment, download).
        device: where the tensors live.

    Raises:
        DataError: not found anywhere (the message names data.root, the system copy and the download), or a
            corrupt/truncated file (named).
    """
    info = dataset_info(cfg.name)
    located = sources.check_available(cfg)
    with tempfile.TemporaryDirectory(prefix="raymoe-data-") as scratch:
        tv_root = sources.torchvision_root(located, cfg.name, Path(scratch))
        splits = {}
        for split, train, limit in (("train", True, cfg.train_limit), ("test", False, cfg.test_limit)):
            x_u8, y = read_split(cfg.name, tv_root, located, train)
            if limit is not None:
                x_u8, y = x_u8[:limit], y[:limit]
            splits[split] = Split(normalize(x_u8, info.mean, info.std, device), y.to(device))
    augment = cfg.augment if cfg.augment is not None else cfg.name in AUGMENTED_BY_DEFAULT
    val = None
    if cfg.val_fraction is not None:
        train = splits["train"]
        keep, held = stratified_holdout(train.y.cpu(), cfg.val_fraction)
        keep, held = keep.to(train.y.device), held.to(train.y.device)
        splits["train"], val = Split(train.x[keep], train.y[keep]), Split(train.x[held], train.y[held])
    return DeviceDataset(name=cfg.name, train=splits["train"], test=splits["test"], val=val,
                         num_classes=info.num_classes,
                         in_channels=info.in_channels, image_size=info.image_size,
                         source=f"{info.title} from {located.description}", augment=augment)

