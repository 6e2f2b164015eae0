"""The package's shape: no import cycles, lower layers never import higher ones, and
every module imports on its own."""
from __future__ import annotations

import ast
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dalle_jax"

# What each subpackage may import from the project besides itself (and the top-level
# helpers config, files, visualize). Models know nothing of data or training; data
# knows nothing of models or training; the training core knows no stage.
ALLOWED = {
    "models": set(),
    "data": set(),
    "diffusion": set(),
    "train": {"models"},
    "sampling": {"models", "train"},
    "stages": {"data", "diffusion", "models", "sampling", "train", "inference"},
    "inference": {"data", "diffusion", "models", "sampling", "stages", "train"},
    "evaluation": {"data", "stages", "train"},
}
TOP_LEVEL = {"config", "errors", "files", "signals", "validate", "visualize", "tools"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (also inside
    functions: a lazy import is still a dependency)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package_initialisers(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_what_is_below_them():
    offences = []
    for name, deps in GRAPH.items():
        layer = name.split(".")[1] if name.count(".") >= 1 else None
        if layer not in ALLOWED:
            continue
        for dep in deps - _package_initialisers(name):
            if dep == "dalle_jax":
                continue
            dep_layer = dep.split(".")[1]
            if dep_layer != layer and dep_layer not in ALLOWED[layer] | TOP_LEVEL - {"tools"}:
                offences.append(f"{name} imports {dep}")
    assert not offences, "\n".join(offences)


def test_the_transformer_imports_nothing_from_the_training_core():
    code = ("import sys, dalle_jax.models.transformer; "
            "bad = sorted(m for m in sys.modules if m.startswith(('dalle_jax.train', "
            "'dalle_jax.data', 'dalle_jax.stages'))); print(bad); assert not bad")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")

    def import_alone(name):
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        return name, result.returncode, result.stderr[-2000:]

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f"{name}: {err}" for name, rc, err in pool.map(import_alone, MODULES)
                    if rc != 0]
    assert not failures, "\n\n".join(failures)
