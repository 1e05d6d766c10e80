"""Load a text data set onto the device once: the three splits' token ids, the fixed validation windows and the
byte accounting for bits per byte; the text analogue of raymoe.data.datasets.DeviceDataset.

Bits per byte (bpb) makes runs with different tokenizers comparable: bpb = sum of the targets' NLL in bits /
UTF-8 bytes behind those targets. `token_bytes_V` (the bytes of every id, exact for the byte and BPE tokenizers)
gives the bytes of any batch of targets; pre-tokenized shards without a tokenizer fall back to the split's
average `bytes_per_token` from meta.json's split_bytes, or to None (then only bits per token are defined).

Shape legend: N tokens in a split, V vocabulary, T = block_size, B windows (a training batch or the validation
subset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from raymoe.data.text import shards
from raymoe.data.text.prepare import prepare_text_data
from raymoe.data.text.tokenizers import TextTokenizer, load_tokenizer
from raymoe.data.text.windows import eval_windows
from raymoe.errors import ConfigError


@dataclass
class TextDataset:
    """Token ids per split on the device (int32, 1-d) and what the model builder and the metrics need."""

    name: str  # "text"
    train: torch.Tensor  # train_N
    val: torch.Tensor  # val_N
    test: torch.Tensor | None  # test_N; None for nanoGPT shards without test.bin
    val_x: torch.Tensor  # val_x_BT: the fixed validation subset (data.text.val_tokens targets at most)
    val_y: torch.Tensor  # val_y_BT
    vocab_size: int  # ids are < vocab_size; the model embeds at least this many rows
    block_size: int  # data.text.block_size
    bytes_per_token: dict[str, float | None]  # UTF-8 bytes per token of each split (None: unknown)
    token_bytes_V: torch.Tensor | None  # UTF-8 bytes of each id on the device (None: unknown tokenizer)
    tokenizer: TextTokenizer | None  # to decode samples; None for shards of unknown origin
    source: str  # where the text came from, for logs and MLflow
    folder: str  # the shard folder read

    def target_bytes(self, y: torch.Tensor, split: str) -> float | None:
        """UTF-8 bytes behind the targets y (any shape): exact with token_bytes_V, else tokens x average."""
        if self.token_bytes_V is not None:
            return float(self.token_bytes_V[y].sum())
        bpt = self.bytes_per_token.get(split)
        return None if bpt is None else y.numel() * bpt


def bits_per_byte(nll_sum_nats: float, num_bytes: float | None) -> float:
    """Summed NLL (natural log, as F.nll_loss(reduction="sum") gives) over targets -> bits per UTF-8 byte."""
    if not num_bytes:
        return math.nan
    return nll_sum_nats / math.log(2) / num_bytes


def _to_device(ids: np.ndarray, limit: int | None, device: torch.device) -> torch.Tensor:
    ids = ids[:limit] if limit is not None else ids
    return torch.from_numpy(np.asarray(ids, dtype=np.int32)).to(device)  # int32: half of int64, any vocab < 2^31


def _check_length(tokens_N: torch.Tensor, split: str, block_size: int) -> None:
    if tokens_N.numel() < block_size + 1:
        raise ConfigError("data.text.block_size", block_size,
                          f"the {split} split has {tokens_N.numel()} tokens, fewer than block_size + 1 "
                          f"({block_size + 1}); use a smaller block size or more text")


def load_text_dataset(cfg, device: torch.device) -> TextDataset:
    """Prepare (first time only), read and move a text data set to `device`.

    Args:
        cfg: the DataConfig (data.text.*, data.root for the cache, train_limit / test_limit in tokens).
        device: where the token tensors live.
    Raises:
        ConfigError: the source is missing or unusable, a split is shorter than one window (field path named).
    """
    t = cfg.text
    folder = prepare_text_data(cfg)
    meta = shards.read_meta(folder)
    splits = {s: shards.open_shard(folder, s, meta) for s in ("train", "val", "test")}
    train = _to_device(splits["train"], cfg.train_limit, device)
    val = _to_device(splits["val"], None, device)
    test = None if splits["test"] is None else _to_device(splits["test"], cfg.test_limit, device)
    for split, tokens in (("train", train), ("val", val), ("test", test)):
        if tokens is not None:
            _check_length(tokens, split, t.block_size)
    tokenizer = load_tokenizer(meta.tokenizer, folder)
    token_bytes = None if tokenizer is None else torch.from_numpy(tokenizer.token_bytes()).to(device)
    bpt = {s: (meta.split_bytes[s] / meta.split_tokens[s]) if meta.split_bytes.get(s) and meta.split_tokens.get(s)
           else None for s in ("train", "val", "test")}
    val_x, val_y = eval_windows(val, t.block_size, t.val_tokens)
    source = meta.description or f"token shards in {folder}"
    return TextDataset(name="text", train=train, val=val, test=test, val_x=val_x, val_y=val_y,
                       vocab_size=meta.vocab_size, block_size=t.block_size, bytes_per_token=bpt,
                       token_bytes_V=token_bytes, tokenizer=tokenizer, source=source, folder=str(folder))
