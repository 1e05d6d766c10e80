"""Parse one split with torchvision's own dataset class and take its arrays as uint8 NCHW tensors (no transforms).

Before handing files to torchvision we check what torchvision would only assert on (IDX headers and sizes),
and when torchvision refuses a CIFAR folder we find the file that fails its checksum, so a corrupt or
truncated file ends as a DataError naming that file rather than a traceback.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import torch
from torchvision.datasets.utils import check_integrity

from raymoe.data.sources import LAYOUTS, DataError, Located, torchvision_class
from raymoe.data.stats import dataset_info

IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte IDX with 3 dims (images) / 1 dim (labels)


def _check_idx(path: Path, ndim: int, name: str, shown: Path) -> int:
    """Validate an IDX file's header and length; returns its item count. `shown` is the file the user has."""
    header_len = 4 * (ndim + 1)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(header_len)
    if len(header) < header_len:
        raise DataError(name, f"{shown} is truncated: {size} bytes, shorter than its IDX header")
    magic, *dims = struct.unpack(f">{ndim + 1}I", header)
    if magic != IDX_MAGIC[ndim]:
        raise DataError(name, f"{shown} is not an unsigned-byte IDX file with {ndim} dimension(s) "
                              f"(magic 0x{magic:08x}, expected 0x{IDX_MAGIC[ndim]:08x})")
    expected = header_len + math.prod(dims)
    if size != expected:
        raise DataError(name, f"{shown} is corrupt or truncated: {size} bytes, its header {dims} needs {expected}")
    return dims[0]


def _read_idx_split(name: str, tv_root: Path, located: Located, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if train else "t10k"
    raw = tv_root / LAYOUTS[name].folder
    images, labels = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    n_images = _check_idx(raw / images, 3, name, located.files[images])
    n_labels = _check_idx(raw / labels, 1, name, located.files[labels])
    if n_images != n_labels:
        raise DataError(name, f"{located.files[images]} holds {n_images} images but {located.files[labels]} "
                              f"holds {n_labels} labels")
    ds = torchvision_class(name)(str(tv_root), train=train, download=False)
    return ds.data.unsqueeze(1), ds.targets.to(torch.int64)  # (N, 28, 28) -> (N, 1, 28, 28)


def _bad_cifar_files(cls, tv_root: Path) -> list[str]:
    """The files of a CIFAR folder that are missing or fail torchvision's MD5 checksums."""
    folder = tv_root / cls.base_folder
    entries = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return [file for file, md5 in entries if not check_integrity(os.path.join(folder, file), md5)]


def _read_cifar_split(name: str, tv_root: Path, located: Located, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cls = torchvision_class(name)
    try:
        ds = cls(str(tv_root), train=train, download=False)
    except Exception as exc:  # torchvision: "not found or corrupted", or an unpickling error
        bad = _bad_cifar_files(cls, tv_root)
        if bad:
            shown = ", ".join(str(located.files.get(f, located.folder / f)) for f in bad)
            raise DataError(name, f"{shown}: does not match torchvision's checksum for {dataset_info(name).title} "
                                  f"(corrupt or truncated file; replace it or download again)") from None
        raise DataError(name, f"cannot read {located.folder}: {type(exc).__name__}: {exc}") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps CIFAR as NHWC numpy
    return x, torch.tensor(ds.targets, dtype=torch.int64)


def read_split(name: str, tv_root: Path, located: Located, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (uint8 images (N, C, H, W), int64 labels (N,)) on the CPU, checked against the data set's facts.

    Raises:
        DataError: a file is corrupt, truncated, or holds data of the wrong shape or label range.
    """
    reader = _read_idx_split if name in ("mnist", "fashion_mnist") else _read_cifar_split
    x, y = reader(name, tv_root, located, train)
    info = dataset_info(name)
    split = "training" if train else "test"
    if tuple(x.shape[1:]) != (info.in_channels, info.image_size, info.image_size):
        raise DataError(name, f"{split} images in {located.folder} have shape {tuple(x.shape[1:])}, expected "
                              f"{(info.in_channels, info.image_size, info.image_size)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= info.num_classes):
        raise DataError(name, f"{split} labels in {located.folder} lie outside 0..{info.num_classes - 1}")
    return x, y
