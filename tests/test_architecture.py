"""The layers of tlkit (docs/architecture.md): imports point down, never in a circle, never at a private name."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tlkit"
# Bottom to top: a module may import its own package and any package on a lower line.
LAYERS = [
    ("errors", "config", "durations"),
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


_SNAPSHOT = """
import json, logging, os, sys, warnings
def snapshot():
    import optuna
    named = {n: g for n, g in logging.root.manager.loggerDict.items() if isinstance(g, logging.Logger)}
    return {
        "env": dict(os.environ),
        "loggers": {n: g.level for n, g in named.items()},
        "handlers": {n: len(g.handlers) for n, g in named.items()},
        "root": [logging.root.level, len(logging.root.handlers)],
        "warnings": [repr(f) for f in warnings.filters],
        "optuna": optuna.logging.get_verbosity(),
    }
# the libraries first: what they do to the process at import is theirs, not tlkit's
import torch, torchvision, timm, lightning, mlflow, mlflow.pyfunc, optuna, sklearn, cv2, PIL, pydantic, typer, rich
before = snapshot()
import importlib, pkgutil, tlkit
for info in pkgutil.walk_packages(tlkit.__path__, "tlkit."):
    if info.name not in ("tlkit.__main__", "tlkit.review.pyfunc_model"):
        importlib.import_module(info.name)
after = snapshot()
changed = {}
for key in before:
    if isinstance(before[key], dict):
        diff = {k: (before[key].get(k), v) for k, v in after[key].items() if before[key].get(k) != v}
        diff.update({k: (v, None) for k, v in before[key].items() if k not in after[key]})
        # a logger that first appears with the default level (NOTSET, no handler) changes nothing
        diff = {k: d for k, d in diff.items() if d != (None, 0)}
        if diff:
            changed[key] = diff
    elif before[key] != after[key]:
        changed[key] = [x for x in after[key] if x not in before[key]] if isinstance(after[key], list) else after[key]
print(json.dumps(changed, default=str))
"""


def test_importing_tlkit_changes_nothing_in_the_process():
    """A library user who imports any tlkit module keeps their environment, loggers, warning filters and library
    settings: only the CLI's entry point configures the process."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "NO_ALBUMENTATIONS"))}
    out = subprocess.run(
        [sys.executable, "-c", _SNAPSHOT], capture_output=True, text=True, env=env, timeout=300, check=True
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {}


MAX_LINES, MAX_PARAMS, MAX_POSITIONAL = 80, 8, 4
# A Typer command's parameters are its options; the library twins of `tlkit baseline` and `tlkit finetune` keep
# the same flat keyword options.
WIDE_BY_DESIGN = {("tlkit.api", "baseline"), ("tlkit.api", "finetune")}
VARIADIC = {"add_row"}  # rich's Table.add_row takes one argument a column


def _is_command(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(
        isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ("command", "callback")
        for d in function.decorator_list
    )


def _shape_faults(name: str) -> list[str]:
    faults = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if lines > MAX_LINES:
                faults.append(f"line {node.lineno}: {node.name} is {lines} lines long (at most {MAX_LINES})")
            args = node.args
            params = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a.arg not in ("self", "cls")]
            if len(params) > MAX_PARAMS and not _is_command(node) and (name, node.name) not in WIDE_BY_DESIGN:
                faults.append(f"line {node.lineno}: {node.name} takes {len(params)} parameters (at most {MAX_PARAMS})")
        if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL:
            callee = ast.unparse(node.func)
            if callee.rsplit(".", 1)[-1] not in VARIADIC:
                faults.append(
                    f"line {node.lineno}: {callee}(...) gets {len(node.args)} positional arguments; name them"
                )
    return faults


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_stay_short_and_calls_name_their_arguments(name):
    faults = _shape_faults(name)
    assert not faults, f"{name}: " + "; ".join(faults)
