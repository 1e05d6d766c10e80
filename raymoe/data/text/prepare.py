"""Text sources -> token shards, once: read the splits, make the tokenizer (BPE: trained on train only), encode,
write nanoGPT-layout shards + meta.json (+ tokenizer.json) into a cache folder, reuse it while the source is unchanged.

The cache folder is <data.root or ./data>/text/<source>-<tokenizer>/ and holds train.bin, val.bin, test.bin,
meta.json (dtype, vocab size, UTF-8 bytes and tokens per split, the source's fingerprint) and, for BPE,
tokenizer.json. It is built in a temporary folder and renamed into place, so Ray workers preparing the same data
at once never read half-written files (call `prepare_text_data` on the driver first to do the work once).
A `bin` source is already in this layout and is only checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from raymoe.data.sources import data_root
from raymoe.data.text import shards
from raymoe.data.text.sources import corpus_folder, fingerprint_inputs, read_texts
from raymoe.data.text.splits import SPLITS
from raymoe.data.text.tokenizers import TOKENIZER_FILE, new_tokenizer, tokenizer_vocab
from raymoe.errors import ConfigError

RULES_VERSION = 1  # bump when the split rules or the document format change: old caches are then rebuilt


def _short_hash(value) -> str:
    return hashlib.blake2b(json.dumps(value).encode(), digest_size=4).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "data"


def cache_folder(data_cfg) -> Path:
    """Where the prepared shards of a corpus / file / hf source live."""
    t = data_cfg.text
    tok = "byte" if t.tokenizer == "byte" else f"bpe{t.vocab_size}"
    if t.source == "corpus":
        name = f"fortunes-{_short_hash(str(corpus_folder(t).resolve()))}"
    elif t.source == "file":
        path = Path(t.path).expanduser().resolve()
        name = f"file-{_slug(path.stem)}-{_short_hash(str(path))}"
    else:
        local = str(Path(t.path).expanduser().resolve()) if t.path else None
        name = f"hf-{_slug(t.hf_name or '')}-{_short_hash([t.hf_name, t.hf_config, t.hf_text_field, local])}"
    return data_root(data_cfg) / "text" / f"{name}-{tok}"


def fingerprint(data_cfg) -> str:
    t = data_cfg.text
    key = [RULES_VERSION, t.tokenizer, tokenizer_vocab(t), fingerprint_inputs(t)]
    return hashlib.blake2b(json.dumps(key).encode(), digest_size=16).hexdigest()


def _is_current(folder: Path, fp: str) -> bool:
    try:
        meta = shards.read_meta(folder)
        shards.check_shards(folder, meta)
    except ConfigError:
        return False
    return meta.fingerprint == fp and (meta.tokenizer != "bpe" or (folder / TOKENIZER_FILE).is_file())


def _install(tmp: Path, folder: Path) -> None:
    """Replace `folder` by `tmp` (rename, so readers see the old or the new folder, never a mix)."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            folder.rename(old)
        except OSError:  # another process moved it first
            old = None
    try:
        tmp.rename(folder)
    except OSError:  # another process installed the same data first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(data_cfg, folder: Path, fp: str) -> None:
    """Tokenize the source into `folder` (through a temporary folder next to it)."""
    t = data_cfg.text
    texts = read_texts(t)
    for split in SPLITS:
        if not any(texts.docs[split]):
            raise ConfigError("data.text.path" if t.source != "hf" else "data.text.hf_name", t.path or t.hf_name,
                              f"the {split} split is empty ({texts.description}); the source is too small")
    tokenizer = new_tokenizer(t.tokenizer, texts.docs["train"], t.vocab_size)  # BPE sees train only
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        dtype = shards.dtype_for(tokenizer.vocab_size)
        meta = shards.ShardMeta(dtype=dtype, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.kind,
                                fingerprint=fp, description=texts.description)
        for split in SPLITS:
            ids_N = tokenizer.encode_documents(texts.docs[split])
            shards.write_shard(tmp, split, ids_N, dtype)
            meta.split_tokens[split] = int(ids_N.size)
            meta.split_bytes[split] = sum(len(d.encode("utf-8")) for d in texts.docs[split])
        if tokenizer.kind == "bpe":
            tokenizer.save(tmp / TOKENIZER_FILE)
        shards.write_meta(tmp, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _install(tmp, folder)


def prepare_text_data(data_cfg) -> Path:
    """The shard folder for cfg.data (built now if missing or stale); ConfigError if the source is unusable."""
    t = data_cfg.text
    if t.source == "bin":
        folder = Path(t.path).expanduser()
        if not folder.is_dir():
            raise ConfigError("data.text.path", t.path, "no such folder (bin: train.bin, val.bin, meta.json)")
        shards.check_shards(folder, shards.read_meta(folder))
        return folder
    folder, fp = cache_folder(data_cfg), fingerprint(data_cfg)
    if not _is_current(folder, fp):
        build(data_cfg, folder, fp)
    return folder
