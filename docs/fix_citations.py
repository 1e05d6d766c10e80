#!/usr/bin/env python3
"""Rewrite citations of the old, out-of-repository specs to sections of docs/*.md.

Comments and docstrings across the repository cite documents that are not in it: "spec §1.2", "(spec §2)",
"paper reference §7.7", "ray-stack.md §6.1", "reference/hypermoe.md §1.2", "hypermoe.md 1.3(3)", "obs. 4", ...
This script rewrites each one to `docs/<file>.md §N` (see docs/README.md for the convention):

    specialization-paper.md, paper, paper spec, paper reference  ->  docs/paper-notes.md
    hypermoe.md, hypermoe spec, HyperMoE "observation 1.3(2)"     ->  docs/hypermoe-notes.md
    ray-stack.md, ray-stack spec                                  ->  docs/ray-notes.md
    spec, notes, reference, or a bare §                           ->  the file's default document (below)

A file's default document: the one old document the file names explicitly, if it names exactly one; otherwise by
path (token-level/HyperMoE code -> hypermoe, Ray/Tune/MLflow/cluster code -> ray, everything else -> the paper).
A § with no prefix inherits the document of an earlier citation on the same line ("§1.2/§1.3/§3").

Only comment and docstring text is touched: `#` comments and docstrings (string statements) in .py files, `#`
comments in YAML, shell, TOML and Makefiles, and the text of Markdown files. Every target section is checked
against the headings of the docs/*.md file; a citation whose section does not exist there is left alone and
reported. Running the script twice changes nothing the second time.

Usage:
    python docs/fix_citations.py --dry-run     # report what would change, write nothing
    python docs/fix_citations.py               # rewrite the files
    python docs/fix_citations.py --check       # like --dry-run, exit 1 if anything would change
Standard library only.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tokenize
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCAN = ["raymoe", "tests", "tune_configs", "cluster", "Makefile"]
SKIP = {"tests/test_docs.py"}  # its regexes and docstrings talk about citations, they are not citations
DOCS = {"paper": "docs/paper-notes.md", "hypermoe": "docs/hypermoe-notes.md", "ray": "docs/ray-notes.md"}
HASH_COMMENT_SUFFIXES = {".yaml", ".yml", ".sh", ".toml", ".cfg", ".ini", ".txt"}

# A section number: 3, 3.1, 3.1.2, a range 1-3, and an optional item in parentheses: 1.3(2), 1.2(c).
NUM = r"\d+(?:\.\d+)*(?:\s*[-\u2013]\s*\d+(?:\.\d+)*)?(?:\([0-9a-z]\))?"
SECTION_RE = re.compile(r"§\s?(" + NUM + r")")

_OLD_DIR = r"(?:(?:\.\./)*(?:shared/)?reference/)?"
OLD_FILES = {  # old document file names -> key
    "paper": re.compile(_OLD_DIR + r"specialization-paper\.md"),
    "hypermoe": re.compile(_OLD_DIR + r"(?<![\w-])hypermoe\.md"),
    "ray": re.compile(_OLD_DIR + r"ray-stack\.md"),
}
NEW_FILES = {key: re.compile(re.escape(path)) for key, path in DOCS.items()}

# Words or names written right before a "§"; the longest match that ends just before the § wins.
_B = r"(?<![\w/.-])"
PREFIXES: list[tuple[re.Pattern, str | None]] = [  # (pattern, key; None = the file's default document)
    (re.compile(r"docs/(?:paper|hypermoe|ray)-notes\.md"), "canonical"),
    (re.compile(_B + _OLD_DIR + r"specialization-paper\.md"), "paper"),
    (re.compile(_B + _OLD_DIR + r"hypermoe\.md"), "hypermoe"),
    (re.compile(_B + _OLD_DIR + r"ray-stack\.md"), "ray"),
    (re.compile(_B + r"(?i:hypermoe)\s+(?i:spec|notes|reference)"), "hypermoe"),
    (re.compile(_B + r"(?i:ray-stack|ray)\s+(?i:spec|notes|reference)"), "ray"),
    (re.compile(_B + r"(?i:paper)(?:\s+(?i:spec|notes|reference))?"), "paper"),
    (re.compile(_B + r"(?i:spec|notes|reference)"), None),
]

# Citations written without "§" (HyperMoE observations); rewritten first, then handled like the others.
HYPERMOE_ITEM = re.compile(_B + _OLD_DIR + r"hypermoe\.md\s+(\d+\.\d+)\((\d+)\)")
HYPERMOE_OBS = re.compile(_B + _OLD_DIR + r"hypermoe\.md\s+obs(?:ervation|\.)?\s*(\d+)")
BARE_OBSERVATION = re.compile(r"\bobservation\s+(\d+\.\d+)\((\d+)\)")  # only in files whose default is hypermoe
BARE_OBS = re.compile(r"(?<![\w.])obs\.\s*(\d+)\b")  # ditto
LEFTOVER_OLD = re.compile(_B + _OLD_DIR + r"(?:specialization-paper|hypermoe|ray-stack|style-anchors)\.md")

PATH_DEFAULTS = [  # first match wins; checked against the path relative to the repository root
    ("hypermoe", re.compile(r"moe/token/|hypermoe|/vit\b|vit\.py$|tune_configs/vit/|test_token|test_vit|moe_layer")),
    ("ray", re.compile(r"raymoe/tune/|raymoe/train/ray_|raymoe/tracking/|^cluster/|test_ray|test_tune|test_mlflow"
                       r"|test_sweep|bench/tune|bench/ep|raymoe/parallel/|^Makefile$")),
]


# ---------------------------------------------------------------------------------------------- the documents


@dataclass
class Doc:
    """The addressable sections of one docs/*.md file (convention in docs/README.md)."""

    headings: set[str] = field(default_factory=set)
    items: dict[str, set[str]] = field(default_factory=dict)  # heading number -> numbered items / (letters)

    @classmethod
    def parse(cls, text: str) -> "Doc":
        doc, current, fence = cls(), None, False
        for line in text.splitlines():
            if line.startswith("```"):
                fence = not fence
                continue
            if fence:
                continue
            m = re.match(r"(#{2,6})\s+(\d+(?:\.\d+)*)\.?\s+\S", line)
            if m:
                current = m.group(2)
                doc.headings.add(current)
                doc.items.setdefault(current, set())
            elif current is not None:
                item = re.match(r"(\d+)\.\s", line)  # numbered item at column 0
                if item:
                    doc.items[current].add(item.group(1))
                for letter in re.findall(r"\*\*\(([a-z])\)", line):  # lettered part, **(c) ...**
                    doc.items[current].add(letter)
        return doc

    def has(self, number: str) -> bool:
        """True if `number` (e.g. "3.1", "7.7", "1.3(2)", "1-3") names a heading or a numbered item here."""
        number = re.sub(r"\s+", "", number)
        m = re.fullmatch(r"(.+?)\(([0-9a-z])\)", number)
        if m:
            return m.group(1) in self.headings and m.group(2) in self.items.get(m.group(1), set())
        if re.search(r"[-\u2013]", number):
            return all(self.has(end) for end in re.split(r"[-\u2013]", number))
        if number in self.headings:
            return True
        parent, _, last = number.rpartition(".")
        return bool(parent) and parent in self.headings and last in self.items.get(parent, set())


def load_docs() -> dict[str, Doc]:
    return {key: Doc.parse((REPO / path).read_text(encoding="utf-8")) for key, path in DOCS.items()}


# ---------------------------------------------------------------------------------------- rewriting one line


@dataclass
class Report:
    changed_files: dict[str, list[tuple[int, str, str]]] = field(default_factory=dict)
    per_doc: Counter = field(default_factory=Counter)  # rewritten citations per target document
    canonical: Counter = field(default_factory=Counter)  # citations already in docs/ form, per document
    inherited: Counter = field(default_factory=Counter)  # a § after another on its line ("§1.2/§1.3"), per document
    unmapped: list[tuple[str, int, str, str]] = field(default_factory=list)  # file, line, text, reason
    outside: list[tuple[str, int, str]] = field(default_factory=list)  # § in code, not in a comment/docstring


def default_key(rel: str, text: str) -> str:
    named = {key for key, rx in OLD_FILES.items() if rx.search(text)}
    named |= {key for key, rx in NEW_FILES.items() if rx.search(text)}
    if len(named) == 1:
        return named.pop()
    for key, rx in PATH_DEFAULTS:
        if rx.search(rel):
            return key
    return "paper"


def _prefix_before(text: str, end: int) -> tuple[int, str | None] | None:
    """The citation prefix ending at `end` (only blanks in between): (start, key), or None."""
    best = None
    for rx, key in PREFIXES:
        for m in rx.finditer(text, 0, end):
            if text[m.end():end].strip() == "" and (best is None or m.start() < best[0]):
                best = (m.start(), key)
    return best


def rewrite_line(line: str, default: str, docs: dict[str, Doc], where: tuple[str, int], report: Report) -> str:
    """One physical line of comment/docstring text, rewritten."""
    hyper = DOCS["hypermoe"]
    rules = [(HYPERMOE_ITEM, lambda m: f"{hyper} §{m.group(1)}({m.group(2)})"),
             (HYPERMOE_OBS, lambda m: f"{hyper} §1.3({m.group(1)})")]
    if default == "hypermoe":
        rules += [(BARE_OBSERVATION, lambda m: f"{hyper} §{m.group(1)}({m.group(2)})"),
                  (BARE_OBS, lambda m: f"{hyper} §1.3({m.group(1)})")]
    for rx, fmt in rules:
        line, n = rx.subn(fmt, line)
        report.per_doc[hyper] += n
        report.canonical[hyper] -= n  # counted as rewritten, not as found in docs/ form, by the loop below

    out, pos, current = [], 0, None  # current: the document of the last citation on this line
    for m in SECTION_RE.finditer(line):
        number = m.group(1)
        found = _prefix_before(line, m.start())
        if found is not None and found[0] < pos:
            found = None  # the prefix overlaps text already emitted (e.g. "§1.2 §3" - nothing to rewrite)
        if found is not None:
            start, key = found
            if key == "canonical":
                key = next(k for k, p in DOCS.items() if line.startswith(p, start))
                report.canonical[DOCS[key]] += 1
                replace = None
            else:
                key = key or default
                replace = (start, m.start())
        elif current is not None:
            key, replace = current, None
            report.inherited[DOCS[key]] += 1
        else:
            key, replace = default, (m.start(), m.start())
        if not docs[key].has(number):
            report.unmapped.append((*where, line.strip(), f"§{number} is not a section or item of {DOCS[key]}"))
            current = key
            continue
        if replace is not None:
            out.append(line[pos:replace[0]])
            out.append(DOCS[key] + " ")
            pos = m.start()
            report.per_doc[DOCS[key]] += 1
        current = key
    out.append(line[pos:])
    new = "".join(out)
    for m in LEFTOVER_OLD.finditer(new):
        report.unmapped.append((*where, new.strip(), f"names {m.group(0)} without a section number"))
    return new


# ------------------------------------------------------------------------------- comment/docstring extraction


def _line_offsets(text: str) -> list[int]:
    offsets, total = [0], 0
    for line in text.splitlines(keepends=True):
        total += len(line)
        offsets.append(total)
    return offsets


def python_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of comments and of string statements (docstrings) in Python source."""
    offsets = _line_offsets(text)
    spans: list[tuple[int, int]] = []
    toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type not in (tokenize.NL, tokenize.ENCODING)]
    starters = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    for i, tok in enumerate(toks):
        if tok.type == tokenize.COMMENT:
            pass
        elif tok.type == tokenize.STRING:
            before = toks[i - 1].type if i else tokenize.NEWLINE
            after = next((t.type for t in toks[i + 1:] if t.type != tokenize.COMMENT), tokenize.ENDMARKER)
            if before not in starters or after not in (tokenize.NEWLINE, tokenize.ENDMARKER):
                continue
        else:
            continue
        spans.append((offsets[tok.start[0] - 1] + tok.start[1], offsets[tok.end[0] - 1] + tok.end[1]))
    return spans


def hash_comment_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of `#` comments in YAML/shell/Makefile text ('#' at line start or after a blank, not quoted)."""
    spans, offset = [], 0
    for line in text.splitlines(keepends=True):
        quote = None
        for i, ch in enumerate(line):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"" and (i == 0 or not line[i - 1].isalnum()):
                quote = ch
            elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
                spans.append((offset + i, offset + len(line.rstrip("\r\n"))))
                break
        offset += len(line)
    return spans


def text_spans(path: Path, text: str) -> list[tuple[int, int]] | None:
    if path.suffix == ".py":
        return python_spans(text)
    if path.suffix in HASH_COMMENT_SUFFIXES or path.name == "Makefile":
        return hash_comment_spans(text)
    if path.suffix == ".md":
        return [(0, len(text))]
    return None


# ---------------------------------------------------------------------------------------------------- driver


def files(names: list[str]) -> list[Path]:
    found = []
    for name in names:
        root = REPO / name
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in candidates:
            rel = p.relative_to(REPO).as_posix()
            if rel in SKIP or "__pycache__" in p.parts:
                continue
            found.append(p)
    return found


def process(path: Path, docs: dict[str, Doc], report: Report) -> str | None:
    """The new text of `path`, or None if nothing changes."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    if "§" not in text and not LEFTOVER_OLD.search(text) and "obs" not in text:
        return None
    rel = path.relative_to(REPO).as_posix()
    try:
        spans = text_spans(path, text)
    except (tokenize.TokenError, SyntaxError) as err:  # e.g. a file someone is halfway through editing
        report.unmapped.append((rel, 0, "", f"skipped, cannot tokenize: {err}"))
        return None
    if spans is None:
        return None
    default = default_key(rel, text)
    covered = [False] * len(text)
    for a, b in spans:
        covered[a:b] = [True] * (b - a)
    for m in re.finditer("§", text):
        if not covered[m.start()]:
            line_no = text.count("\n", 0, m.start()) + 1
            report.outside.append((rel, line_no, text.splitlines()[line_no - 1].strip()))
    new_text = text
    for a, b in sorted(spans, reverse=True):  # from the end, so earlier offsets stay valid
        chunk = text[a:b]
        first_line = text.count("\n", 0, a) + 1
        lines = chunk.split("\n")
        new_lines = [rewrite_line(line, default, docs, (rel, first_line + k), report) for k, line in enumerate(lines)]
        for k, (old, new) in enumerate(zip(lines, new_lines)):
            if old != new:
                report.changed_files.setdefault(rel, []).append((first_line + k, old.strip(), new.strip()))
        new_text = new_text[:a] + "\n".join(new_lines) + new_text[b:]
    return new_text if new_text != text else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    parser.add_argument("--check", action="store_true", help="like --dry-run; exit 1 if anything would change")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every changed line")
    parser.add_argument("paths", nargs="*", default=SCAN,
                        help=f"files or folders relative to the repository root (default: {' '.join(SCAN)})")
    args = parser.parse_args(argv)
    write = not (args.dry_run or args.check)
    docs, report, pending = load_docs(), Report(), {}
    for path in files(args.paths):
        new = process(path, docs, report)
        if new is not None:
            pending[path] = new
    for path, new in pending.items():
        if write:
            path.write_text(new, encoding="utf-8")

    verb = "rewrote" if write else "would rewrite"
    changes = sum(len(v) for v in report.changed_files.values())
    print(f"{verb} {sum(report.per_doc.values())} citations on {changes} lines in {len(pending)} files")
    for doc in DOCS.values():
        print(f"  -> {doc}: {report.per_doc[doc]} rewritten, {report.canonical[doc]} already in docs/ form, "
              f"{report.inherited[doc]} following another citation on the same line")
    for rel, lines in sorted(report.changed_files.items()):
        print(f"  {rel}: {len(lines)} line(s)")
        if args.verbose:
            for line_no, old, new in lines:
                print(f"    {line_no}: {old}\n    {' ' * len(str(line_no))}  -> {new}")
    if report.unmapped:
        print(f"could not map {len(report.unmapped)} citation(s):")
        for rel, line_no, text, reason in report.unmapped:
            print(f"  {rel}:{line_no}: {reason}\n      {text}")
    else:
        print("could not map: none")
    if report.outside:
        print(f"left alone, § outside comments/docstrings: {len(report.outside)}")
        for rel, line_no, text in report.outside:
            print(f"  {rel}:{line_no}: {text}")
    return 1 if args.check and pending else 0


if __name__ == "__main__":
    sys.exit(main())
