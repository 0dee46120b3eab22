"""The layers of tlkit (docs/architecture.md): imports point down, never in a circle, never at a private name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tlkit"
# Bottom to top: a module may import its own package and any package on a lower line.
LAYERS = [
    ("errors", "config"),
    ("core",),
    ("data",),
    ("models",),
    ("features",),
    ("train",),
    ("review",),
    ("runs",),
    ("pipelines",),
    ("cli", "api", "serving", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    found = {}
    for file in sorted(ROOT.rglob("*.py")):
        parts = file.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every tlkit import in module `name`, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tlkit":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append(
                    (submodule, "", node.lineno) if submodule in MODULES else (node.module, alias.name, node.lineno)
                )
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name.split(".")[0] == "tlkit"]
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_sits_in_a_layer():
    assert not [m for m in MODULES if m != "tlkit" and _layer(m) not in RANK], f"add them to LAYERS: {list(MODULES)}"
    assert len(MODULES) > 40, f"the walk found only {len(MODULES)} modules under {ROOT}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m != "tlkit"))
def test_imports_point_down_at_public_names(name):
    rank = RANK[_layer(name)]
    upward = [
        f"line {line}: {target}"
        for target, _, line in _imports(name)
        if target != "tlkit" and RANK[_layer(target)] > rank
    ]
    private = [
        f"line {line}: {target}.{what}"
        for target, what, line in _imports(name)
        if what.startswith("_") and not what.startswith("__")
    ]
    assert not upward, f"{name} imports from a higher layer: {upward}"
    assert not private, f"{name} imports a private name of another module: {private}"


def test_no_import_circle():
    graph = {name: {t for t, _, _ in _imports(name) if t in MODULES and t not in (name, "tlkit")} for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (circle := visit(nxt, path + [node])):
                return circle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start, [])):
            pytest.fail(f"import circle: {' -> '.join(circle)}")
