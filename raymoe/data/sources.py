"""Where the data set files come from, in the issue's order: data.root, a system copy, a torchvision download.

Every place holds the files in their original formats (IDX for (Fashion-)MNIST, the python pickle batches for
CIFAR); `torchvision_root` lays them out the way torchvision's dataset classes expect, so parsing is always
torchvision's. When no place has them, DataError (a ConfigError on data.name, CLI exit 2) names every place
tried and how to fix it.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from raymoe.data.stats import dataset_info
from raymoe.errors import ConfigError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# System-wide copies, searched after data.root. Debian's dataset-fashion-mnist installs the original gzipped IDX
# files here. Tests monkeypatch this mapping; an entry is a folder holding the files flat (gzipped or not).
SYSTEM_LOCATIONS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
}
SYSTEM_PACKAGES: dict[str, str] = {"fashion_mnist": "dataset-fashion-mnist"}  # Debian package per data set


@dataclass(frozen=True)
class Layout:
    """The files of one data set as torchvision expects them under its root folder."""

    folder: str  # below the torchvision root, e.g. FashionMNIST/raw
    files: tuple[str, ...]
    gzip_ok: bool  # IDX files may be present only as <name>.gz (as distributed); we decompress them


LAYOUTS: dict[str, Layout] = {
    "mnist": Layout("MNIST/raw", IDX_FILES, True),
    "fashion_mnist": Layout("FashionMNIST/raw", IDX_FILES, True),
    "cifar10": Layout("cifar-10-batches-py",
                      tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"), False),
    "cifar100": Layout("cifar-100-python", ("train", "test", "meta"), False),
}


class DataError(ConfigError):
    """The data set cannot be found or read; a ConfigError on `data.name`, so the CLI exits with code 2."""

    def __init__(self, name: str, problem: str):
        super().__init__("data.name", name, problem)

    def __reduce__(self):
        return type(self), (self.value, self.problem)


@dataclass(frozen=True)
class Located:
    """One place that holds every file of a data set."""

    kind: str  # "root", "system" or "download"
    folder: Path  # the folder holding the files
    files: dict[str, Path] = field(default_factory=dict)  # torchvision file name -> the file found (maybe .gz)

    @property
    def description(self) -> str:
        label = {"root": "data.root", "system": "system copy", "download": "downloaded by torchvision into"}
        return f"{label[self.kind]} {self.folder}"


def data_root(cfg) -> Path:
    """data.root as an absolute path (default ./data)."""
    return Path(os.path.expanduser(cfg.root or "data")).resolve()


def _find_files(folder: Path, layout: Layout) -> tuple[dict[str, Path], list[str]]:
    """The layout's files present in `folder` (plain preferred over .gz) and the names that are missing."""
    found, missing = {}, []
    for name in layout.files:
        candidates = [folder / name] + ([folder / f"{name}.gz"] if layout.gzip_ok else [])
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(f"{name}[.gz]" if layout.gzip_ok else name)
        else:
            found[name] = hit
    return found, missing


def _look(kind: str, folder: Path, layout: Layout, tried: list[tuple[str, str]]) -> Located | None:
    if not folder.is_dir():
        tried.append((kind, f"{folder}: no such folder"))
        return None
    found, missing = _find_files(folder, layout)
    if missing:
        tried.append((kind, f"{folder}: missing {', '.join(missing)}"))
        return None
    return Located(kind, folder, found)


def locate(cfg, tried: list[tuple[str, str]] | None = None) -> Located | None:
    """The first place among data.root and the system copies that holds every file; no download.

    Args:
        cfg: the DataConfig.
        tried: when given, (kind, what was wrong) per place looked at is appended (for error messages).
    """
    tried = [] if tried is None else tried
    layout = LAYOUTS[cfg.name]
    places = [("root", data_root(cfg) / layout.folder)]
    places += [("system", Path(p)) for p in SYSTEM_LOCATIONS.get(cfg.name, ())]
    for kind, folder in places:
        located = _look(kind, folder, layout, tried)
        if located is not None:
            return located
    if not SYSTEM_LOCATIONS.get(cfg.name):
        tried.append(("system", f"none is known for {dataset_info(cfg.name).title}"))
    return None


def _not_found(cfg, tried: list[tuple[str, str]], download_problem: str) -> DataError:
    info, layout, root = dataset_info(cfg.name), LAYOUTS[cfg.name], data_root(cfg)
    fixes = []
    if cfg.name in SYSTEM_PACKAGES:
        fixes.append(f"install the system copy: apt-get install {SYSTEM_PACKAGES[cfg.name]}")
    gz = " (gzipped or not)" if layout.gzip_ok else ""
    fixes.append(f"copy {', '.join(layout.files)}{gz} into {root / layout.folder}")
    if not cfg.download:
        fixes.append("allow the download: --set data.download=true")
    lines = [f"{info.title} not found. Looked in:",
             "  1) data.root: " + "; ".join(text for kind, text in tried if kind == "root"),
             "  2) system copy: " + "; ".join(text for kind, text in tried if kind == "system"),
             f"  3) torchvision download into {root}: {download_problem}",
             "Fix: " + "; or ".join(fixes)]
    return DataError(cfg.name, "\n".join(lines))


def torchvision_class(name: str):
    """torchvision's Dataset class of a config `data.name` (imported on first use: it is slow to import)."""
    from torchvision import datasets as tvd

    return {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
            "cifar100": tvd.CIFAR100}[name]


def download(cfg) -> Located:
    """Let torchvision download the data set into data.root (then found there in its layout)."""
    root = data_root(cfg)
    tried: list[tuple[str, str]] = []
    try:
        root.mkdir(parents=True, exist_ok=True)
        torchvision_class(cfg.name)(str(root), train=True, download=True)
    except Exception as exc:  # network, disk, checksum: all end as one clear message
        locate(cfg, tried)
        raise _not_found(cfg, tried, f"failed ({type(exc).__name__}: {exc})".replace("\n", " ")) from None
    located = locate(cfg, tried)
    if located is None or located.kind != "root":
        raise _not_found(cfg, tried, "torchvision reported success but the files are not there")
    return Located("download", located.folder, located.files)


def check_available(cfg) -> Located:
    """Find the data set now, downloading it if that is the only way (so Ray workers never race to download).

    Raises:
        DataError: no place has it and the download is off or failed; the message names all three places.
    """
    tried: list[tuple[str, str]] = []
    located = locate(cfg, tried)
    if located is not None:
        return located
    if not cfg.download:
        raise _not_found(cfg, tried, "off (data.download = false)")
    return download(cfg)


def _decompress(src: Path, dst: Path, name: str) -> None:
    try:
        with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=1 << 22)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; truncation is an EOFError
        raise DataError(name, f"cannot decompress {src}: {exc} (corrupt or truncated file; replace it, e.g. "
                              f"reinstall the package or download it again)") from None


def torchvision_root(located: Located, name: str, scratch: Path) -> Path:
    """A folder in torchvision's layout for `located`: data.root itself when possible, else built in `scratch`.

    Gzipped IDX files are decompressed into scratch; plain files are symlinked (copied where links fail).
    """
    layout = LAYOUTS[name]
    plain = all(p.name == f for f, p in located.files.items())
    if located.kind in ("root", "download") and plain:
        return located.folder.parents[len(Path(layout.folder).parts) - 1]
    target = scratch / layout.folder
    target.mkdir(parents=True, exist_ok=True)
    for file_name, path in located.files.items():
        dst = target / file_name
        if path.name != file_name:
            _decompress(path, dst, name)
        else:
            try:
                dst.symlink_to(path.resolve())
            except OSError:
                shutil.copyfile(path, dst)
    return scratch
