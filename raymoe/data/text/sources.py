"""Raw text by split for the sources that hold text (corpus, file, hf); `bin` shards are read by shards.py.

Each reader returns the documents of train / val / test under the rules of splits.py, and `fingerprint_inputs`
says what the prepared token data depends on (files with size and mtime, or the HF identifiers), so a changed
source is re-tokenized and an unchanged one is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raymoe.data.text.corpus import FORTUNES_DIR, FORTUNES_PACKAGE, corpus_documents, fortune_files
from raymoe.data.text.splits import SPLITS, TEST_BUCKET, VAL_BUCKET, bucket, split_documents, split_lines
from raymoe.errors import ConfigError

HF_VAL_NAMES = ("validation", "valid", "val")


@dataclass(frozen=True)
class SplitTexts:
    """Documents per split (each document carries its own trailing separator) and where they came from."""

    docs: dict[str, list[str]]
    description: str


def corpus_folder(text_cfg) -> Path:
    return Path(text_cfg.path).expanduser() if text_cfg.path else FORTUNES_DIR


def text_files(path: Path) -> list[Path]:
    """The .txt files of a folder (recursively, sorted), or [path] for a file."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.txt") if p.is_file()) if path.is_dir() else []


def input_files(text_cfg) -> list[Path]:
    """The local files a corpus / file / hf source reads (hf: its data_files, if any)."""
    if text_cfg.source == "corpus":
        return fortune_files(corpus_folder(text_cfg))
    if text_cfg.path is None:
        return []
    path = Path(text_cfg.path).expanduser()
    if text_cfg.source == "hf":
        return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return text_files(path)


def fingerprint_inputs(text_cfg) -> list:
    """What the prepared data of this source depends on, as JSON-able values."""
    files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in input_files(text_cfg)]
    ids = [text_cfg.source, text_cfg.hf_name, text_cfg.hf_config, text_cfg.hf_text_field] \
        if text_cfg.source == "hf" else [text_cfg.source]
    return ids + files


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def read_corpus(text_cfg) -> SplitTexts:
    folder = corpus_folder(text_cfg)
    files = fortune_files(folder)
    if not files:
        raise ConfigError("data.text.path", str(folder), f"no fortune files there; install Debian's corpus with "
                          f"`apt-get install {FORTUNES_PACKAGE}` or point data.text.path at a folder of them")
    return SplitTexts(split_documents(corpus_documents(folder)),
                      f"Debian fortunes ({len(files)} files in {folder}), entries split by content hash 18/1/1")


def read_file(text_cfg) -> SplitTexts:
    path = Path(text_cfg.path).expanduser()
    files = text_files(path)
    if not files:
        raise ConfigError("data.text.path", text_cfg.path, "no such file, or a folder without .txt files")
    if path.is_file():
        return SplitTexts(split_lines(_read(path)), f"text file {path}, lines split 90/5/5 in order")
    docs = [t if t.endswith("\n") else t + "\n" for t in map(_read, files)]
    return SplitTexts(split_documents(docs), f"{len(files)} .txt files in {path}, files split by content hash "
                                             f"18/1/1")


def read_hf(text_cfg) -> SplitTexts:
    """A HF `datasets` data set: Hub id when online, or a local builder ("parquet", "json", ...) with data.text.path.

    Splits named train / validation (or valid, val) / test are used as they are; a missing val or test split is
    carved out of train by the hash rule (buckets 18 / 19), so the three never overlap.
    """
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.text.source", "hf", "needs the `datasets` package: pip install datasets") from None
    kwargs = {}
    if text_cfg.path is not None:
        path = Path(text_cfg.path).expanduser()
        kwargs = {"data_dir": str(path)} if path.is_dir() else {"data_files": str(path)}
    try:
        ds = datasets.load_dataset(text_cfg.hf_name, text_cfg.hf_config, **kwargs)
    except Exception as exc:  # offline, unknown name, bad files: one clear message
        raise ConfigError("data.text.hf_name", text_cfg.hf_name,
                          f"datasets.load_dataset failed: {type(exc).__name__}: {exc}".replace("\n", " ")) from None
    if "train" not in ds:
        raise ConfigError("data.text.hf_name", text_cfg.hf_name, f"has no train split (splits: {list(ds)})")

    def docs_of(split_name: str) -> list[str]:
        split = ds[split_name]
        if text_cfg.hf_text_field not in split.column_names:
            raise ConfigError("data.text.hf_text_field", text_cfg.hf_text_field,
                              f"not a column of split {split_name} (columns: {split.column_names})")
        return [t if t.endswith("\n") else t + "\n" for t in split[text_cfg.hf_text_field] if t]

    train = docs_of("train")
    val_name = next((n for n in HF_VAL_NAMES if n in ds), None)
    carved = {"val": val_name is None, "test": "test" not in ds}
    out = {"train": [], "val": [] if carved["val"] else docs_of(val_name),
           "test": [] if carved["test"] else docs_of("test")}
    for doc in train:
        b = bucket(doc)
        if carved["val"] and b == VAL_BUCKET:
            out["val"].append(doc)
        elif carved["test"] and b == TEST_BUCKET:
            out["test"].append(doc)
        else:
            out["train"].append(doc)
    how = ", ".join(f"{s} carved from train by hash" for s in SPLITS if carved.get(s)) or "its own splits"
    return SplitTexts(out, f"HF dataset {text_cfg.hf_name}" + (f"/{text_cfg.hf_config}" if text_cfg.hf_config else "")
                      + (f" ({text_cfg.path})" if text_cfg.path else "") + f", {how}")


READERS = {"corpus": read_corpus, "file": read_file, "hf": read_hf}


def read_texts(text_cfg) -> SplitTexts:
    """Documents per split for data.text.source corpus / file / hf."""
    return READERS[text_cfg.source](text_cfg)
