"""The method notes in docs/ against the code that cites them.

(a) every section citation in the code ("docs/paper-notes.md §3.1", "§7.7", "§1.3(2)", "§1-3") names a docs/*.md
    file on its line and a heading or numbered item that exists there (convention in docs/README.md);
(b) docs/shapes.md defines every letter that the modules' "Shape legend:" lines and the tensor-name suffixes use.
Pure text checks: no torch, no Ray.
"""

from __future__ import annotations

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
THIS = Path(__file__).resolve()

NUM = r"\d+(?:\.\d+)*(?:\s*[-\u2013]\s*\d+(?:\.\d+)*)?(?:\([0-9a-z]\))?"
CITATION = re.compile(r"§\s?(" + NUM + r")")
DOC_PATH = re.compile(r"docs/([\w.-]+\.md)")
OLD_NAMES = re.compile(r"(?<![\w/.-])(?:[\w./]*/)?(?:specialization-paper|hypermoe|ray-stack|style-anchors)\.md"
                       r"|(?<![\w.])obs\.\s*\d")


def _code_files() -> list[Path]:
    files = [*ROOT.glob("raymoe/**/*.py"), *ROOT.glob("tune_configs/**/*.yaml"), *ROOT.glob("tests/**/*.py"),
             *ROOT.glob("cluster/**/*"), ROOT / "Makefile"]
    found = sorted(p for p in files if p.is_file() and p.resolve() != THIS and "__pycache__" not in p.parts)
    assert len(found) > 100, f"only {len(found)} code files found under {ROOT}"  # a wrong root checks nothing
    return found


class _Doc:
    """Headings "## 3. Title" / "### 3.1 Title", numbered items "7. ..." (column 0) and parts "**(c)" under them."""

    def __init__(self, text: str):
        self.headings: set[str] = set()
        self.items: dict[str, set[str]] = {}
        current, fence = None, False
        for line in text.splitlines():
            if line.startswith("```"):
                fence = not fence
            elif not fence and (m := re.match(r"#{2,6}\s+(\d+(?:\.\d+)*)\.?\s+\S", line)):
                current = m.group(1)
                self.headings.add(current)
                self.items.setdefault(current, set())
            elif not fence and current is not None:
                if m := re.match(r"(\d+)\.\s", line):
                    self.items[current].add(m.group(1))
                self.items[current].update(re.findall(r"\*\*\(([a-z])\)", line))

    def has(self, number: str) -> bool:
        number = re.sub(r"\s+", "", number)
        if m := re.fullmatch(r"(.+?)\(([0-9a-z])\)", number):
            return m.group(2) in self.items.get(m.group(1), set())
        if re.search(r"[-\u2013]", number):
            return all(self.has(end) for end in re.split(r"[-\u2013]", number))
        parent, _, last = number.rpartition(".")
        return number in self.headings or last in self.items.get(parent, set())


_DOC_CACHE: dict[str, _Doc | None] = {}


def _doc(name: str) -> _Doc | None:
    if name not in _DOC_CACHE:
        path = DOCS / name
        _DOC_CACHE[name] = _Doc(path.read_text(encoding="utf-8")) if path.is_file() else None
    return _DOC_CACHE[name]


def _unresolved(line: str, own_doc: str | None = None) -> list[str]:
    """Why each citation on this line does not resolve (empty: all resolve)."""
    problems = []
    for m in CITATION.finditer(line):
        paths = DOC_PATH.findall(line, 0, m.start())
        name = paths[-1] if paths else own_doc
        if name is None:
            problems.append(f"§{m.group(1)} names no docs/*.md file on its line")
        elif _doc(name) is None:
            problems.append(f"docs/{name} does not exist")
        elif not _doc(name).has(m.group(1)):
            problems.append(f"§{m.group(1)} is not a heading or numbered item of docs/{name}")
    return problems


def test_code_citations_resolve_to_docs():
    problems = []
    for path in _code_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(ROOT)
        for no, line in enumerate(text.splitlines(), 1):
            problems += [f"{rel}:{no}: {why}" for why in _unresolved(line)]
            problems += [f"{rel}:{no}: cites {m.group(0)!r}, not a docs/*.md section" for m in OLD_NAMES.finditer(line)]
    assert not problems, "\n".join(problems)


def test_citations_inside_docs_resolve():
    """A bare § in docs/X.md means X itself; docs/README.md is skipped (it shows the syntax with examples)."""
    problems = []
    docs = sorted(DOCS.glob("*.md"))
    assert len(docs) >= 5, f"docs/ holds {len(docs)} notes"
    for path in docs:
        if path.name == "README.md":
            continue
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            problems += [f"docs/{path.name}:{no}: {why}" for why in _unresolved(line, own_doc=path.name)]
    assert not problems, "\n".join(problems)


def test_section_numbers_follow_the_cited_layout():
    """The numbers the code cites exist (spot checks of the numbering kept from the source notes)."""
    paper, hyper, ray = _doc("paper-notes.md"), _doc("hypermoe-notes.md"), _doc("ray-notes.md")
    for number in ["1", "1.1", "1.2", "1.3", "2", "3", "3.1", "3.2", "3.3", "3.4", "4", "4.2", "4.4", "4.5", "7",
                   *(f"7.{i}" for i in range(1, 10))]:
        assert paper.has(number), f"paper-notes.md §{number}"
    for number in ["1.1", "1.2", "1.2(c)", "1.3", "1.3(2)", "1.3(4)", "2.1", "2.2", "3.2", "3.3", "3.4", "5"]:
        assert hyper.has(number), f"hypermoe-notes.md §{number}"
    for number in ["1.1", "1.2", "1.3", "1.4", "1.5", "2", "3", "4.1", "4.2", "4.3", "4.4", "4.5", "5.1", "5.2",
                   "6.1", "6.2", "6.3", "7"]:
        assert ray.has(number), f"ray-notes.md §{number}"
    assert not paper.has("5") and not paper.has("7.10") and not ray.has("3.1")


# ------------------------------------------------------------------------------------------ (b) shape letters


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"docs/shapes.md has no '## {title}' section"
    return m.group(1)


def _legend_letters() -> set[str]:
    table = _section((DOCS / "shapes.md").read_text(encoding="utf-8"), "Legend")
    return set(re.findall(r"^\| `([A-Za-z])` \|", table, re.M))


def _split_items(text: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [*items, cur]


def _module_legends() -> dict[str, set[str]]:
    """Letters each module's "Shape legend:" (or "Legend:") line defines."""
    found = {}
    for path in sorted([*ROOT.glob("raymoe/**/*.py"), *ROOT.glob("tests/**/*.py")]):
        if path.resolve() == THIS:
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = re.search(r"(?:Shape legend|^Legend):\s*(.*)", line.strip())
            if not m:
                continue
            text = m.group(1)
            for nxt in lines[i + 1:]:
                if not nxt.strip() or nxt.strip().startswith('"""'):
                    break
                text += " " + nxt.strip()
            text = re.split(r"\.(?:\s|\"\"\"|$)(?![^(]*\))", text)[0]
            letters = set()
            for item in _split_items(text):
                if lead := re.match(r"\s*([A-Za-z](?:'|/[A-Za-z])*)(?=[\s=]|$)", item):
                    letters.update(lead.group(1).replace("'", "").split("/"))
            found[str(path.relative_to(ROOT))] = letters
    return found


def test_shapes_md_defines_every_legend_letter():
    legends = _module_legends()
    assert len(legends) >= 20, legends  # the parser found the modules' legend lines
    defined = _legend_letters()
    missing = {f"{rel}: {sorted(letters - defined)}" for rel, letters in legends.items() if letters - defined}
    assert not missing, "letters used in Shape legend lines but not defined in docs/shapes.md:\n" + "\n".join(
        sorted(missing))


SUFFIX = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Za-z0-9]*[A-Z][A-Za-z0-9]*)\b")
NOT_SHAPES = {"XXXX"}  # `epoch_XXXX` is a folder-name pattern, not a shape


def test_shapes_md_defines_every_suffix_letter():
    defined, missing = _legend_letters(), {}
    for path in sorted([*ROOT.glob("raymoe/**/*.py"), *ROOT.glob("tests/**/*.py")]):
        for m in SUFFIX.finditer(path.read_text(encoding="utf-8")):
            suffix = m.group(1)
            if suffix in NOT_SHAPES or len(re.sub(r"\d", "", suffix)) > 6:
                continue
            for letter in set(re.sub(r"\d", "", suffix)) - defined:
                missing.setdefault(letter, set()).add(f"{path.relative_to(ROOT)}:{m.group(0)}")
    assert not missing, {k: sorted(v)[:5] for k, v in missing.items()}


def _renames() -> list[tuple[str, str, str]]:
    table = _section((DOCS / "shapes.md").read_text(encoding="utf-8"), "Renames applied")
    rows = re.findall(r"^\| (\S+) \| `([\w]+)` \| `([\w]+)` \|", table, re.M)
    assert rows, "no rename rows parsed"
    return rows


def test_rename_table_names_real_files():
    for rel, old, new in _renames():
        assert old != new and re.fullmatch(r"[a-z][\w]*", new), (rel, old, new)
        assert (ROOT / rel).parent.is_dir(), rel


def test_shape_renames_applied():
    left = [f"{rel}: {old} -> {new}" for rel, old, new in _renames()
            if (ROOT / rel).is_file() and re.search(rf"\b{old}\b", (ROOT / rel).read_text(encoding="utf-8"))]
    assert not left, "\n".join(left)
