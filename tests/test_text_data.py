"""Text data (raymoe/data/text): tokenizers, the fixed split rules, the real Debian corpus, nanoGPT .bin shards,
HF datasets on local files, device windows, bits-per-byte accounting and the exit-2 errors of data.text.

Shape legend: N tokens, B windows, T block size, W evaluation windows.
"""

from __future__ import annotations

import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download (read when datasets is imported)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from raymoe.config.load import load_experiment
from raymoe.config.schema import DataConfig, TextDataConfig
from raymoe.data.text import corpus, shards
from raymoe.data.text.dataset import bits_per_byte, load_text_dataset
from raymoe.data.text.prepare import prepare_text_data
from raymoe.data.text.splits import split_documents, split_lines, split_of
from raymoe.data.text.tokenizers import TOKENIZER_FILE, BpeTokenizer, ByteTokenizer
from raymoe.data.text.windows import eval_windows, sample_windows
from raymoe.errors import ConfigError

CPU = torch.device("cpu")
FORTUNES = corpus.FORTUNES_DIR
needs_fortunes = pytest.mark.skipif(not corpus.fortune_files(FORTUNES),
                                    reason=f"Debian's fortunes corpus is not installed ({FORTUNES}); "
                                           "`make test` installs it as root (apt-get install fortunes)")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


def _data(tmp_path, **text) -> DataConfig:
    return DataConfig(name="text", root=str(tmp_path / "cache"), text=TextDataConfig(**text))


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trips_any_utf8():
    text = "Grüße, 世界! 🙂\n\ttab%\n"
    tok = ByteTokenizer()
    ids = tok.encode_documents([text[:7], text[7:]])
    assert ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


TRAIN_WORD, HELD_OUT_WORD = "quokkaberry", "zyzzogeton"


def _bpe_folder(folder: Path, n: int = 160) -> dict[str, list[str]]:
    """A folder of .txt documents where TRAIN_WORD occurs only in train documents and HELD_OUT_WORD only in
    val/test ones (the hash rule decides, so each candidate is placed after its final text is known)."""
    folder.mkdir(parents=True)
    placed: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    i = 0
    while len(placed["train"]) < n or len(placed["val"]) + len(placed["test"]) < 12:
        for word in (TRAIN_WORD, HELD_OUT_WORD):
            times = 3 if word == TRAIN_WORD else 40  # about as many occurrences in all as the train word
            doc = f"Document {i}: the café serves {(word + ' ') * times}tea, naïve ✓ {i * 7919 % 1000}.\n"
            split = split_of(doc)
            if (word == TRAIN_WORD) == (split == "train"):
                placed[split].append(doc)
                (folder / f"doc{i:04d}-{word[0]}.txt").write_text(doc)
        i += 1
    return placed


def test_bpe_trains_on_the_train_split_only_and_is_reloaded_identically(tmp_path, monkeypatch):
    placed = _bpe_folder(tmp_path / "docs")
    cfg = _data(tmp_path, source="file", path=str(tmp_path / "docs"), tokenizer="bpe", vocab_size=300,
                block_size=8, val_tokens=16)
    data = load_text_dataset(cfg, CPU)
    assert data.vocab_size == 300 and data.tokenizer.vocab_size == 300
    pieces = data.tokenizer.tokenizer.get_vocab()
    assert any("quokk" in p for p in pieces)  # frequent in train -> merged
    assert not any("zyzz" in p or "ogeton" in p for p in pieces)  # as frequent, but only in val/test
    saved = Path(data.folder) / TOKENIZER_FILE
    assert saved.is_file()
    reloaded = BpeTokenizer.load(saved)
    docs = placed["val"] + placed["test"]
    np.testing.assert_array_equal(reloaded.encode_documents(docs), data.tokenizer.encode_documents(docs))
    assert reloaded.tokenizer.get_vocab() == pieces

    def no_training(*args, **kwargs):
        raise AssertionError("the saved tokenizer should have been reused")

    monkeypatch.setattr(BpeTokenizer, "train", classmethod(no_training))
    again = load_text_dataset(cfg, CPU)
    assert torch.equal(again.train, data.train) and torch.equal(again.val, data.val)
    # exact bytes behind every split, whatever the merges
    meta = shards.read_meta(Path(data.folder))
    for split in ("train", "val", "test"):
        tokens = getattr(data, split).long()
        assert int(data.token_bytes_V[tokens].sum()) == meta.split_bytes[split]
        assert data.tokenizer.decode(tokens.tolist()) == "".join(placed[split]) or split == "train"
    # an edited source is re-tokenized (and the BPE retrained), never served stale
    next(iter(sorted((tmp_path / "docs").glob("*.txt")))).write_text("changed\n")
    with pytest.raises(AssertionError, match="reused"):
        load_text_dataset(cfg, CPU)


# ---------------------------------------------------------------- split rules and the corpus

def _independent_bucket(doc: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "big") % 20


def test_document_split_rule_is_the_documented_hash_and_ignores_order():
    docs = [f"entry {i}\n%\n" for i in range(400)]
    splits = split_documents(docs)
    for name, bucket_ok in (("train", lambda b: b < 18), ("val", lambda b: b == 18), ("test", lambda b: b == 19)):
        assert splits[name] and all(bucket_ok(_independent_bucket(d)) for d in splits[name])
    reordered = split_documents(docs[::-1] + ["a new entry\n%\n"])  # order and additions move nothing
    assert all(set(splits[k]) <= set(reordered[k]) for k in splits)


def test_single_file_split_is_contiguous_by_lines():
    text = "".join(f"{i}\n" for i in range(100))
    parts = split_lines(text)
    assert [p[0].count("\n") for p in (parts["train"], parts["val"], parts["test"])] == [90, 5, 5]
    assert parts["train"][0] + parts["val"][0] + parts["test"][0] == text


def test_fortune_files_are_parsed_like_fortune_does(tmp_path):
    (tmp_path / "jokes").write_text("one\nline two\n%\n%\nthree\n%\nlast, no final newline")
    (tmp_path / "jokes.dat").write_bytes(b"\x00\x00\x00\x02 index")
    (tmp_path / "jokes.u8").symlink_to(tmp_path / "jokes")
    assert corpus.fortune_files(tmp_path) == [tmp_path / "jokes"]
    assert corpus.corpus_documents(tmp_path) == ["one\nline two\n%\n", "three\n%\n", "last, no final newline\n%\n"]


@needs_fortunes
def test_real_debian_corpus_splits_are_disjoint_deterministic_and_90_5_5():
    docs = corpus.corpus_documents(FORTUNES)
    assert len(docs) > 1000 and all(d.endswith("%\n") for d in docs)
    first, second = split_documents(docs), split_documents(list(docs))
    assert first == second
    sets = {k: set(v) for k, v in first.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sum(map(len, first.values())) == len(docs)
    for split in ("val", "test"):
        assert 0.03 < len(first[split]) / len(docs) < 0.07


@needs_fortunes
def test_real_corpus_loads_as_bytes_onto_the_device(tmp_path):
    data = load_text_dataset(_data(tmp_path, block_size=64, val_tokens=4096), CPU)
    meta = shards.read_meta(Path(data.folder))
    assert data.vocab_size == 256 and "fortunes" in data.source
    assert data.train.numel() == meta.split_bytes["train"] > 15 * data.val.numel()
    text = data.tokenizer.decode(data.val[:4000].tolist())
    assert "\n%\n" in text
    assert data.val_y.numel() == 4096 // 64 * 64


# ---------------------------------------------------------------- nanoGPT .bin shards

def _write_bin(folder: Path, dtype, vocab: int, sizes=(500, 100, 80), meta: dict | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = {}
    for split, n in zip(("train", "val", "test"), sizes):
        if n:
            ids[split] = rng.integers(0, vocab, n).astype(dtype)
            ids[split].tofile(folder / f"{split}.bin")  # nanoGPT's prepare.py: np.array(ids, dtype).tofile(...)
    (folder / "meta.json").write_text(json.dumps(meta or {"dtype": np.dtype(dtype).name, "vocab_size": vocab}))
    return ids


@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 50257), (np.uint32, 100_000)])
def test_bin_shards_in_nanogpt_layout_are_read_back_equal(tmp_path, dtype, vocab):
    ids = _write_bin(tmp_path / "owt", dtype, vocab)
    data = load_text_dataset(_data(tmp_path, source="bin", path=str(tmp_path / "owt"), block_size=16,
                                   val_tokens=64), CPU)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(data, split).numpy(), ids[split].astype(np.int64))
    meta = shards.read_meta(tmp_path / "owt")
    np.testing.assert_array_equal(np.asarray(shards.open_shard(tmp_path / "owt", "val", meta)), ids["val"])
    assert data.vocab_size == vocab and data.token_bytes_V is None and data.bytes_per_token["val"] is None
    assert math.isnan(bits_per_byte(10.0, data.target_bytes(data.val_y, "val")))  # no bytes known: bits/token only


def test_bin_without_test_shard_and_with_byte_counts(tmp_path):
    _write_bin(tmp_path / "sh", np.uint16, 65, sizes=(300, 90, 0),
               meta={"dtype": "uint16", "vocab_size": 65, "split_bytes": {"train": 600, "val": 180},
                     "split_tokens": {"train": 300, "val": 90}})
    data = load_text_dataset(_data(tmp_path, source="bin", path=str(tmp_path / "sh"), block_size=8,
                                   val_tokens=32), CPU)
    assert data.test is None and data.bytes_per_token["val"] == 2.0
    assert data.target_bytes(data.val_y, "val") == 2.0 * data.val_y.numel()


def test_bits_per_byte_of_a_uniform_byte_model_is_eight(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo wörld\n" * 200)
    data = load_text_dataset(_data(tmp_path, source="file", path=str(path), block_size=8, val_tokens=64), CPU)
    nll_sum = data.val_y.numel() * math.log(256)  # uniform over the 256 byte ids
    assert bits_per_byte(nll_sum, data.target_bytes(data.val_y, "val")) == pytest.approx(8.0)


# ---------------------------------------------------------------- HF datasets on local files

def test_hf_source_reads_a_local_parquet_dataset_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"record {i}: some words {i % 13}" for i in range(300)]
    pq.write_table(pa.table({"text": docs, "id": list(range(300))}), tmp_path / "train.parquet")
    import datasets

    cfg = _data(tmp_path, source="hf", hf_name="parquet", path=str(tmp_path / "train.parquet"), block_size=8,
                val_tokens=32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
        data = load_text_dataset(cfg, CPU)
    expected_val = "".join(d + "\n" for d in docs if split_of(d + "\n") == "val")  # carved from train by hash
    assert data.tokenizer.decode(data.val.tolist()) == expected_val
    assert "parquet" in data.source and "carved" in data.source
    bad = _data(tmp_path, source="hf", hf_name="parquet", path=str(tmp_path / "train.parquet"),
                hf_text_field="body")
    with pytest.raises(ConfigError) as err:
        prepare_text_data(bad)
    assert err.value.path == "data.text.hf_text_field"


# ---------------------------------------------------------------- windows

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_windows_are_shifted_by_one_inside_the_split_and_seeded(device):
    tokens_N = torch.arange(1000, dtype=torch.int32, device=device)
    gen = torch.Generator(device=device).manual_seed(5)
    x_BT, y_BT = sample_windows(tokens_N, 16, 32, gen)
    assert x_BT.shape == y_BT.shape == (32, 16) and x_BT.dtype == torch.long and x_BT.device.type == device
    assert torch.equal(y_BT[:, :-1], x_BT[:, 1:]) and torch.equal(y_BT, x_BT + 1)  # contiguous, shifted by one
    assert int(x_BT.min()) >= 0 and int(y_BT.max()) <= 999
    again = sample_windows(tokens_N, 16, 32, torch.Generator(device=device).manual_seed(5))
    assert torch.equal(again[0], x_BT)
    other = sample_windows(tokens_N, 16, 32, torch.Generator(device=device).manual_seed(6))
    assert not torch.equal(other[0], x_BT)
    ranks = [sample_windows(tokens_N, 16, 32, torch.Generator(device=device).manual_seed(5), r, 3)[0]
             for r in range(3)]
    assert torch.equal(torch.cat(ranks), x_BT)  # the ranks' slices are the single-process batch


def test_eval_windows_are_fixed_evenly_spread_and_never_score_a_token_twice():
    tokens_N = torch.arange(1000, dtype=torch.int32)
    x_BT, y_BT = eval_windows(tokens_N, 16, max_tokens=320)
    assert x_BT.shape == (20, 16) and torch.equal(y_BT, x_BT + 1)
    targets = y_BT.flatten()
    assert targets.unique().numel() == targets.numel() and int(targets.max()) <= 999
    assert int(x_BT[0, 0]) == 0 and int(y_BT[-1, -1]) == 999  # spread over the whole split
    assert torch.equal(eval_windows(tokens_N, 16, 320)[0], x_BT)
    whole_x, _ = eval_windows(tokens_N, 16)
    assert whole_x.shape[0] == 999 // 16


# ---------------------------------------------------------------- bad input: ConfigError with the field path

def _experiment(tmp_path, text: dict, gpt: dict | None = None, **data) -> dict:
    (tmp_path / "t.txt").write_text("".join(f"line {i}\n" for i in range(300)))
    return {"name": "lm", "data": {"name": "text", "root": str(tmp_path / "cache"), **data,
                                   "text": {"source": "file", "path": str(tmp_path / "t.txt"), "block_size": 32,
                                            **text}},
            "model": {"arch": "gpt_moe", "num_experts": 4, "gpt": {"block_size": 64, **(gpt or {})}},
            "gate": {"kind": "topk", "top_k": 2}, "train": {"max_steps": 10}}


BAD = [  # (id, data.text patch, model.gpt patch, other data keys, field path)
    ("block-above-model-context", {"block_size": 128}, {}, {}, "data.text.block_size"),
    ("val-subset-below-one-window", {"val_tokens": 16}, {}, {}, "data.text.val_tokens"),
    ("file-without-path", {"path": None}, {}, {}, "data.text.path"),
    ("file-missing", {"path": "/no/such/file.txt"}, {}, {}, "data.text.path"),
    ("corpus-folder-without-fortunes", {"source": "corpus", "path": "EMPTY"}, {}, {}, "data.text.path"),
    ("hf-without-name", {"source": "hf", "path": None}, {}, {}, "data.text.hf_name"),
    ("hf-name-on-another-source", {"hf_name": "wikitext"}, {}, {}, "data.text.hf_name"),
    ("bpe-vocab-above-model-rows", {"tokenizer": "bpe", "vocab_size": 4096}, {"vocab_size": 1024}, {},
     "model.gpt.vocab_size"),
    ("byte-vocab-above-model-rows", {}, {"vocab_size": 100}, {}, "model.gpt.vocab_size"),
    ("bpe-vocab-below-bytes", {"tokenizer": "bpe", "vocab_size": 100}, {}, {}, "data.text.vocab_size"),
    ("unknown-tokenizer", {"tokenizer": "wordpiece"}, {}, {}, "data.text.tokenizer"),
    ("unknown-source", {"source": "s3"}, {}, {}, "data.text.source"),
    ("unknown-key", {"bogus": 1}, {}, {}, "data.text.bogus"),
    ("train-limit-below-one-window", {}, {}, {"train_limit": 32}, "data.train_limit"),
    ("augment-text", {}, {}, {"augment": True}, "data.augment"),
]


@pytest.mark.parametrize("text, gpt, data, path", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_text_settings_name_the_field(tmp_path, text, gpt, data, path):
    if text.get("path") == "EMPTY":
        (tmp_path / "empty").mkdir()
        text = {**text, "path": str(tmp_path / "empty")}
    with pytest.raises(ConfigError) as err:
        load_experiment(raw=_experiment(tmp_path, text, gpt, **data))
    assert err.value.path == path, str(err.value)


@pytest.mark.parametrize("problem", ["no-meta", "bad-dtype", "truncated", "no-val", "vocab-above-model"])
def test_bad_bin_shards_name_the_field(tmp_path, problem):
    folder = tmp_path / "sh"
    _write_bin(folder, np.uint16, 1000)
    gpt, path = {}, "data.text.path"
    if problem == "no-meta":
        (folder / "meta.json").unlink()
    elif problem == "bad-dtype":
        (folder / "meta.json").write_text(json.dumps({"dtype": "int8", "vocab_size": 1000}))
    elif problem == "truncated":
        with open(folder / "train.bin", "ab") as f:
            f.write(b"\x01")  # half a uint16
    elif problem == "no-val":
        (folder / "val.bin").unlink()
    else:
        gpt, path = {"vocab_size": 512}, "model.gpt.vocab_size"  # meta says 1000 ids
    with pytest.raises(ConfigError) as err:
        load_experiment(raw=_experiment(tmp_path, {"source": "bin", "path": str(folder)}, gpt))
    assert err.value.path == path, str(err.value)


def test_splits_shorter_than_a_window_are_refused_when_loaded(tmp_path):
    _write_bin(tmp_path / "sh", np.uint16, 50, sizes=(500, 20, 80))
    cfg = load_experiment(raw=_experiment(tmp_path, {"source": "bin", "path": str(tmp_path / "sh")}))
    with pytest.raises(ConfigError) as err:
        load_text_dataset(cfg.data, CPU)
    assert err.value.path == "data.text.block_size" and "val" in err.value.problem


def test_bad_text_config_exits_2_through_the_cli(tmp_path, monkeypatch, capsys):
    from raymoe.cli import main

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump(_experiment(tmp_path, {"block_size": 128})))
    code = main(["train", str(config)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "data.text.block_size" in lines[0] and "128" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()
