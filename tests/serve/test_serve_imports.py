"""t2i.serve imports only downward (pipelines, lora, text, diffusion, errors, config), never train/ or cli/."""

from __future__ import annotations

import ast
from pathlib import Path

SERVE = Path(__file__).resolve().parents[2] / "src" / "t2i" / "serve"
ALLOWED = ("t2i.serve", "t2i.pipelines", "t2i.lora", "t2i.text", "t2i.diffusion", "t2i.models", "t2i.errors",
           "t2i.config")


def t2i_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n == "t2i" or n.startswith("t2i.")]


def test_serve_imports_only_lower_layers():
    files = sorted(SERVE.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in t2i_imports(path):
            assert name.startswith(ALLOWED), f"{path.name} imports {name}"
