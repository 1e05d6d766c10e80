"""The package layout stays acyclic: no module imports itself through others, and no package imports a package
that imports it back (imports under `if TYPE_CHECKING:` are annotations only and do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "raymoe").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(tree: ast.AST, known: dict[str, Path]) -> set[str]:
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("raymoe"):
                out.add(child.module)
                out.update(f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in known)
            elif isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name.startswith("raymoe"))
            visit(child)

    visit(tree)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    assert len(known) > 100, f"only {len(known)} modules found under {ROOT / 'raymoe'}"
    return {m: {t for t in _imports(ast.parse(p.read_text(encoding="utf-8")), known) if t in known and t != m}
            for m, p in known.items()}


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, by depth-first search (None when there is none)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_module_imports_itself_through_others():
    graph = _graph()
    cycles = [c for m in sorted(graph) if (c := _cycle_from(graph, m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_no_two_packages_import_each_other():
    graph = _graph()
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        own = _package(module)
        packages.setdefault(own, set()).update(_package(t) for t in targets if _package(t) != own)
    cycles = [c for p in sorted(packages) if (c := _cycle_from(packages, p))]
    assert not cycles, "package cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert _cycle_from({"a": {"b"}, "b": set()}, "a") is None
