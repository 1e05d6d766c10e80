"""Shared fixtures: tiny data sets in the real MNIST/Fashion-MNIST IDX format, and process-state hygiene."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def write_idx_images(path: Path, images_BSS: np.ndarray) -> None:
    """IDX3: magic 0x00000803, count, rows, cols (big-endian int32), then uint8 pixels; gzip'd."""
    n, h, w = images_BSS.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, h, w))
        f.write(np.ascontiguousarray(images_BSS, dtype=np.uint8).tobytes())


def write_idx_labels(path: Path, labels_B: np.ndarray) -> None:
    """IDX1: magic 0x00000801, count, then uint8 labels; gzip'd."""
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels_B)))
        f.write(np.asarray(labels_B, dtype=np.uint8).tobytes())


def learnable_images(labels_B: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 noise with a bright bar whose row depends on the class: easy to learn in one or two epochs."""
    n = len(labels_B)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, c in enumerate(labels_B):
        row = 3 + 2 * int(c)
        images[i, row:row + 2, 4:24] = 255
    return images.astype(np.uint8)


def write_idx_dataset(root: Path, n_train: int = 256, n_test: int = 128, seed: int = 0,
                      layout: str = "flat") -> Path:
    """Write an MNIST-format data set (10 classes) under `root`.

    layout "flat": the four .gz files directly in root (like Debian's /usr/share/datasets/fashion-mnist);
    "torchvision": root/FashionMNIST/raw/ as torchvision.datasets.FashionMNIST expects.
    Returns the folder holding the files.
    """
    rng = np.random.default_rng(seed)
    folder = root if layout == "flat" else root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images_file, labels_file = IDX_FILES[split]
        write_idx_images(folder / images_file, learnable_images(labels, rng))
        write_idx_labels(folder / labels_file, labels)
    return folder


@pytest.fixture(scope="session")
def tiny_fmnist_root(tmp_path_factory) -> Path:
    """A data.root holding 256 training / 128 test images in the real Fashion-MNIST IDX format (.gz files in
    torchvision's FashionMNIST/raw layout)."""
    root = tmp_path_factory.mktemp("tiny_fmnist")
    write_idx_dataset(root, 256, 128, layout="torchvision")
    return root


@pytest.fixture
def restore_torch_state():
    """In-process training sets torch's global switches (threads, deterministic kernels); put them back."""
    import torch.utils.deterministic

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.set_flush_denormal(False)  # torch's default


@pytest.fixture
def one_thread():
    """Tiny models: OpenMP barriers on a busy 2-core box cost more than the work (0.5 s vs 5 ms a forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
