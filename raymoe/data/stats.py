"""Per-dataset facts: shape, classes and the paper's normalisation (docs/paper-notes.md §1.2 table).

The mean/std are the reference code's transforms.Normalize arguments, kept verbatim (CIFAR-10 uses the rounded
values of the AAAI notebooks), so inputs match the reference exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """What the model builder and the normaliser need to know about one data set."""

    title: str  # human-readable name for messages
    num_classes: int
    in_channels: int
    image_size: int  # images are square
    num_train: int  # size of the full official training split
    num_test: int
    mean: tuple[float, ...]  # per channel, of pixel values scaled to [0, 1]
    std: tuple[float, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("MNIST", 10, 1, 28, 60_000, 10_000, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetInfo("Fashion-MNIST", 10, 1, 28, 60_000, 10_000, (0.2859,), (0.3530,)),
    "cifar10": DatasetInfo("CIFAR-10", 10, 3, 32, 50_000, 10_000, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
    "cifar100": DatasetInfo("CIFAR-100", 100, 3, 32, 50_000, 10_000, (0.5074, 0.4867, 0.4411),
                            (0.2011, 0.1987, 0.2025)),
}

AUGMENTED_BY_DEFAULT = ("cifar100",)  # paper: flip + reflect-pad crop only in the CIFAR-100 (master) code


def dataset_info(name: str) -> DatasetInfo:
    """The facts for a config `data.name`; KeyError for an unknown name (the config schema rules those out)."""
    return DATASETS[name]
