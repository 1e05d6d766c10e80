"""Token shards in nanoGPT's layout: <folder>/{train,val,test}.bin, the raw ids back to back (np.uint16 or
np.uint32, native little-endian, no header, as `np.array(ids, dtype).tofile(path)` writes them), read with np.memmap;
plus meta.json:

    {"dtype": "uint16", "vocab_size": 50257}                       # required
    "tokenizer": "byte" | "bpe" | null                             # optional: how the ids were made
    "split_bytes": {"train": ..., "val": ..., "test": ...}         # optional: UTF-8 bytes behind each split
    "split_tokens": {...}, "fingerprint": "...", "description": "..."  # written by raymoe's own preparation

test.bin may be absent (nanoGPT's prepare scripts write train and val only); the test split is then None.
Shape legend: N tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from raymoe.errors import ConfigError

META_FILE = "meta.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
REQUIRED_SPLITS = ("train", "val")


@dataclass
class ShardMeta:
    dtype: str
    vocab_size: int
    tokenizer: str | None = None
    split_bytes: dict[str, int] = field(default_factory=dict)
    split_tokens: dict[str, int] = field(default_factory=dict)
    fingerprint: str | None = None
    description: str | None = None


def dtype_for(vocab_size: int) -> str:
    """The smallest nanoGPT dtype holding ids < vocab_size."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_meta(folder: Path, path_field: str = "data.text.path") -> ShardMeta:
    """meta.json of a shard folder; ConfigError on `path_field` naming what is wrong."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ConfigError(path_field, str(folder), f"no {META_FILE} there; write one like "
                          '{"dtype": "uint16", "vocab_size": 50257} next to train.bin and val.bin')
    try:
        raw = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(path_field, str(meta_path), f"cannot read it as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(path_field, str(meta_path), "must hold a JSON object")
    unknown = sorted(set(raw) - set(ShardMeta.__dataclass_fields__))
    if unknown:
        raise ConfigError(path_field, str(meta_path), f"unknown key {unknown[0]!r}; allowed: "
                          f"{sorted(ShardMeta.__dataclass_fields__)}")
    if raw.get("dtype") not in DTYPES:
        raise ConfigError(path_field, str(meta_path), f"dtype {raw.get('dtype')!r} must be one of {list(DTYPES)}")
    vocab = raw.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ConfigError(path_field, str(meta_path), f"vocab_size {vocab!r} must be an integer >= 1")
    if vocab > np.iinfo(DTYPES[raw["dtype"]]).max + 1:
        raise ConfigError(path_field, str(meta_path), f"vocab_size {vocab} does not fit dtype {raw['dtype']}")
    return ShardMeta(**raw)


def write_meta(folder: Path, meta: ShardMeta) -> None:
    (folder / META_FILE).write_text(json.dumps(asdict(meta), indent=1) + "\n")


def shard_path(folder: Path, split: str) -> Path:
    return folder / f"{split}.bin"


def check_shards(folder: Path, meta: ShardMeta, path_field: str = "data.text.path") -> None:
    """train.bin and val.bin exist; every present shard is a whole number of ids."""
    itemsize = np.dtype(DTYPES[meta.dtype]).itemsize
    for split in ("train", "val", "test"):
        path = shard_path(folder, split)
        if not path.is_file():
            if split in REQUIRED_SPLITS:
                raise ConfigError(path_field, str(folder), f"missing {path.name} (nanoGPT layout: train.bin, "
                                  "val.bin, optional test.bin, meta.json)")
            continue
        size = path.stat().st_size
        if size % itemsize or size == 0:
            raise ConfigError(path_field, str(path), f"{size} bytes is not a whole, non-zero number of "
                              f"{meta.dtype} ids (corrupt or truncated shard, or the wrong dtype in {META_FILE})")


def open_shard(folder: Path, split: str, meta: ShardMeta) -> np.ndarray | None:
    """The split's ids as a read-only memmap (None for an absent test.bin)."""
    path = shard_path(folder, split)
    if not path.is_file():
        return None
    return np.memmap(path, dtype=DTYPES[meta.dtype], mode="r")


def write_shard(folder: Path, split: str, ids_N: np.ndarray, dtype: str) -> None:
    np.asarray(ids_N).astype(DTYPES[dtype]).tofile(shard_path(folder, split))
