"""The walls between the package's layers hold: docs/DESIGN.md's table of
layers, checked against every import of every module (read with ast, not
run), in the package the tests import (installed or the checkout)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

import parallel_save

PACKAGE = "parallel_save"
PACKAGE_DIR = Path(parallel_save.__file__).parent
DESIGN = Path(__file__).resolve().parent.parent / "docs" / "DESIGN.md"


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (workers/ through its
    symlink in a checkout: os.walk follows it)."""
    found = {}
    for directory, _, files in os.walk(PACKAGE_DIR, followlinks=True):
        for file in files:
            if not file.endswith(".py"):
                continue
            parts = [PACKAGE, *Path(directory).relative_to(PACKAGE_DIR).parts]
            if file != "__init__.py":
                parts.append(file[:-3])
            found[".".join(parts)] = Path(directory) / file
    return found


MODULES = module_files()


def documented_layers() -> dict[str, int]:
    """{module: layer} from the rows ``| n | `a`, `b` | ... |`` of DESIGN.md."""
    layers = {}
    for number, names in re.findall(r"^\| (\d+) \| ((?:`[\w.]+`(?:, )?)+) \|",
                                    DESIGN.read_text(), re.MULTILINE):
        for name in re.findall(r"`([\w.]+)`", names):
            layers[name if name == PACKAGE else f"{PACKAGE}.{name}"] = int(number)
    return layers


LAYERS = documented_layers()


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import
    statement of ``module`` that names a module of the package, at any
    depth (a function's import counts too).  ``from m import x`` imports
    the module m.x when there is one, else the name x of m."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    package = module if is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names
                      if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    found.append((f"{source}.{alias.name}", None, node.lineno))
                elif source in MODULES:
                    found.append((source, alias.name, node.lineno))
    return found


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(PACKAGE_DIR.parent)}:{line}"


def test_every_module_has_a_documented_layer():
    assert sorted(set(MODULES) - set(LAYERS)) == [], (
        "modules missing from the table of layers in docs/DESIGN.md")
    assert sorted(set(LAYERS) - set(MODULES)) == [], (
        "docs/DESIGN.md lists modules the package does not have")


def test_no_module_imports_a_higher_layer():
    upward = [f"{where(module, line)}: {module} (layer {LAYERS[module]}) imports {target} "
              f"(layer {LAYERS[target]})"
              for module in MODULES for target, _, line in imports(module)
              if LAYERS[target] > LAYERS[module]]
    assert upward == []


def test_no_module_imports_another_modules_private_names():
    private = [f"{where(module, line)}: {module} imports {name} from {target}"
               for module in MODULES for target, name, line in imports(module)
               if name is not None and name.startswith("_") and not name.startswith("__")
               and target != module]
    assert private == []


def test_the_package_has_no_import_cycle():
    graph = {module: {target for target, _, _ in imports(module)} for module in MODULES}
    cycles = []
    for start in graph:
        # Depth-first from each module, looking for a way back to it.
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for target in sorted(graph[module]):
                if target == start:
                    cycles.append(" -> ".join([*path, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    assert cycles == []


@pytest.mark.parametrize("module", ["parallel_save.format", "parallel_save.tracking.contract"])
def test_the_checks_see_the_imports(module):
    # The walls are only as good as the import reading: what it finds for
    # two modules whose imports are known.
    targets = {target for target, _, _ in imports(module)}
    assert {"parallel_save.errors"} <= targets
    assert all(LAYERS[target] <= LAYERS[module] for target in targets)
