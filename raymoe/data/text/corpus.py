"""The offline English corpus: Debian's `fortunes` package (apt-get install fortunes).

Each fortune file is plain UTF-8 text; entries are separated by lines holding only `%`. Every regular file in the
folder is a fortune file except the `strfile` indexes (*.dat) and the *.u8 symlinks. An entry is a document for
the hash split rule (splits.py) and is written back in the file format, `<entry>%\n`, so the model sees the
original text and learns where a fortune ends. Entries are read in a fixed order (files by name, entries in
file order); that order has no influence on the split.
"""

from __future__ import annotations

import re
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")  # Debian's fortunes(-min) install their files here
FORTUNES_PACKAGE = "fortunes"
_SEPARATOR = re.compile(r"^%$\n?", flags=re.MULTILINE)  # a line holding only %


def fortune_files(folder: Path) -> list[Path]:
    """The fortune text files in `folder`, sorted by name (empty if the folder is missing)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != ".dat")


def parse_entries(text: str) -> list[str]:
    """Entries of one fortune file (each ends with a newline); empty entries are dropped."""
    entries = []
    for chunk in _SEPARATOR.split(text):
        if chunk.strip():
            entries.append(chunk if chunk.endswith("\n") else chunk + "\n")
    return entries


def corpus_documents(folder: Path) -> list[str]:
    """Every entry of every fortune file as `<entry>%\\n`."""
    docs = []
    for path in fortune_files(folder):
        docs += [e + "%\n" for e in parse_entries(path.read_bytes().decode("utf-8", errors="replace"))]
    return docs
