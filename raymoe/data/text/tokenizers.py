"""Text -> token ids: a byte-level tokenizer (256 ids, no files) and a ByteLevel BPE trained locally.

Both map every token id to a fixed byte string, so the UTF-8 bytes behind any run of tokens are exact
(`token_bytes_V`): bits per byte = bits of the targets / bytes of the targets, whatever the tokenizer.
The BPE is GPT-2's byte-level scheme (HF `tokenizers`: ByteLevel pre-tokenizer without a prefix space, BPE model,
ByteLevel decoder), trained on the training split only and saved as tokenizer.json next to the token data.

Shape legend: V vocabulary size, N tokens.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer(Protocol):
    kind: str  # "byte" | "bpe"
    vocab_size: int

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        """All documents' ids, concatenated in order (int64, N)."""

    def decode(self, ids) -> str: ...

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each id (int64, V)."""


class ByteTokenizer:
    """One id per UTF-8 byte."""

    kind, vocab_size = "byte", 256

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        return np.frombuffer("".join(docs).encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode, the byte <-> printable character table of the ByteLevel tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # bytes without a printable glyph are shifted past 255
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class BpeTokenizer:
    """A trained HF `tokenizers` ByteLevel BPE."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, docs: list[str], vocab_size: int) -> "BpeTokenizer":
        """Learn merges on `docs` (the training split only) up to vocab_size ids (256 byte ids + merges)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no prefix: bytes stay exact
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "BpeTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        encoded = self.tokenizer.encode_batch(docs, add_special_tokens=False)  # parallel in Rust
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encoded]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        table = _unicode_to_byte()
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for piece, i in self.tokenizer.get_vocab().items():
            out[i] = len(piece) if all(c in table for c in piece) else len(piece.encode("utf-8"))
        return out


def tokenizer_vocab(text_cfg) -> int:
    """The ids a data.text tokenizer produces: byte 256 (ByteTokenizer.vocab_size), bpe data.text.vocab_size."""
    return text_cfg.vocab_size if text_cfg.tokenizer == "bpe" else ByteTokenizer.vocab_size


def new_tokenizer(kind: str, train_docs: list[str], vocab_size: int) -> TextTokenizer:
    """The byte tokenizer, or a BPE trained on train_docs (the caller saves it next to the token data)."""
    return ByteTokenizer() if kind == "byte" else BpeTokenizer.train(train_docs, vocab_size)


def load_tokenizer(kind: str | None, folder: Path) -> TextTokenizer | None:
    """The tokenizer a prepared folder was made with (None for pre-tokenized shards of unknown origin)."""
    if kind == "byte":
        return ByteTokenizer()
    path = folder / TOKENIZER_FILE
    return BpeTokenizer.load(path) if kind == "bpe" and path.is_file() else None
