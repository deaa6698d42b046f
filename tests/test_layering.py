"""The package layering of docs/CONTRACTS.md, checked on the source: no import cycle between modules, and no
import from a lower package to a higher one. Every import counts, including those inside functions (a lazy
import is still a dependency); only `if TYPE_CHECKING:` blocks are left out.

`python tests/test_layering.py` prints the counts (modules, cycles, upward imports) and lists the offenders.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Highest first; a package may import only packages at its own rank or below (docs/CONTRACTS.md).
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("serve", "recipes"),
    ("train",),
    ("metrics",),
    ("pipelines",),
    ("lora",),
    ("text",),
    ("convert",),
    ("models",),
    ("diffusion",),
    ("data",),
    ("config",),
    ("atomic",),  # whole-or-absent file writes, disk-full errors: used from data up to cli
    ("errors",),
]
RANK = {package: len(LAYERS) - i for i, group in enumerate(LAYERS) for package in group}


def module_names(src: Path = SRC) -> dict[str, Path]:
    """{dotted module name: file} for every module under src/t2i (a package is its __init__)."""
    names = {}
    for path in sorted((src / "t2i").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` (a module or a module attribute) refers to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """{module: modules of t2i it imports} (self-imports and the lazy top-level `t2i` package left out)."""
    modules = module_names(src)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            if imported.split(".")[0] != "t2i":
                continue
            target = _resolve(imported, modules)
            if target not in (None, name, "t2i"):
                targets.add(target)
        graph[name] = targets
    return graph


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "t2i"


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where the imported module's package ranks above the importer's."""
    found = []
    for module, targets in graph.items():
        mine = RANK.get(package_of(module))
        if mine is None:
            continue
        for target in targets:
            theirs = RANK.get(package_of(target))
            if theirs is not None and theirs > mine:
                found.append((module, target))
    return sorted(found)


def unranked_packages(graph: dict[str, set[str]]) -> list[str]:
    return sorted({package_of(m) for m in graph} - set(RANK) - {"t2i"})


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


# ----------------------------------------------------------------------------------------------- tests


def test_the_checker_finds_cycles_and_upward_imports(tmp_path):
    pkg = tmp_path / "t2i"
    for sub in ("models", "diffusion"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("from t2i.models.b import f\n")
    (pkg / "models" / "b.py").write_text("def f():\n    from t2i.models import a\n")
    (pkg / "diffusion" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from t2i.models.a import x\n"
        "def g():\n    from ..models import b\n"
    )
    graph = import_graph(tmp_path)
    assert import_cycles(graph) == [["t2i.models.a", "t2i.models.b"]]
    assert upward_imports(graph) == [("t2i.diffusion.c", "t2i.models.b")]


def test_every_package_has_a_layer():
    assert unranked_packages(import_graph()) == []


def test_no_import_cycles_between_modules():
    assert import_cycles(import_graph()) == []


def test_no_imports_from_a_lower_package_to_a_higher_one():
    assert upward_imports(import_graph()) == []


if __name__ == "__main__":
    graph = import_graph()
    cycles, upward = import_cycles(graph), upward_imports(graph)
    print(f"modules: {len(graph)}  cycles: {len(cycles)}  upward imports: {len(upward)}")
    for cycle in cycles:
        print("cycle:", " <-> ".join(cycle))
    for importer, imported in upward:
        print(f"upward: {importer} -> {imported}")
    for package in unranked_packages(graph):
        print("no layer:", package)
