"""The fixed rules that divide text into train / val / test; the three never share a document or a line.

* Documents (fortune entries, files of a folder, records of a HF split): bucket = blake2b-64(UTF-8 text) mod 20;
  buckets 0-17 -> train, 18 -> val, 19 -> test (90 / 5 / 5). A hash of the content, not the position, so adding
  or reordering documents never moves the others, and identical documents always share a split.
* One plain file (a single stream, e.g. tiny Shakespeare): contiguous by lines, nanoGPT style: the first 90% of
  the lines -> train, the next 5% -> val, the last 5% -> test.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")
BUCKETS = 20
VAL_BUCKET, TEST_BUCKET = 18, 19


def bucket(doc: str) -> int:
    """The document's bucket in [0, 20), stable across Python runs and machines (no hash randomisation)."""
    digest = hashlib.blake2b(doc.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def split_of(doc: str) -> str:
    b = bucket(doc)
    return "val" if b == VAL_BUCKET else "test" if b == TEST_BUCKET else "train"


def split_documents(docs: list[str]) -> dict[str, list[str]]:
    """Documents by split under the hash rule; order within a split is the input order."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for doc in docs:
        out[split_of(doc)].append(doc)
    return out


def split_lines(text: str) -> dict[str, list[str]]:
    """A single stream by the contiguous rule (90 / 5 / 5 of the lines); each split is one document."""
    lines = text.splitlines(keepends=True)
    n = len(lines)
    a, b = (n * 18) // 20, (n * 19) // 20
    return {"train": ["".join(lines[:a])], "val": ["".join(lines[a:b])], "test": ["".join(lines[b:])]}
