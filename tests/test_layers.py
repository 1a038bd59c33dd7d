"""The layering, read from every module's imports (including those inside functions).

root (settings, ids, errors, timestamps) <- store <- domain <- web's shared pieces (request
id, deadline, auth, dependencies, headers, logs, connections) <- the faces (api, rest) <-
web/app.py (assembles them) <- cli. A module imports its own layer or lower ones; the two
faces never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "consumers_graphql"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Lowest first; a module's layer is its longest matching prefix.
LAYERS: dict[str, int] = {
    PACKAGE: 0,
    f"{PACKAGE}.store": 1,
    f"{PACKAGE}.domain": 2,
    f"{PACKAGE}.web": 3,
    f"{PACKAGE}.api": 4,
    f"{PACKAGE}.rest": 4,
    f"{PACKAGE}.web.app": 5,
    f"{PACKAGE}.cli": 6,
}
FACES = (f"{PACKAGE}.api", f"{PACKAGE}.rest")
# The layers that must not know HTTP or GraphQL.
FRAMEWORK_FREE = (f"{PACKAGE}.store", f"{PACKAGE}.domain")
FRAMEWORKS = ("strawberry", "graphql", "fastapi", "starlette", "uvicorn", "h11")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def _group(name: str) -> str:
    return max((prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")),
               key=len)


def _imports(name: str, path: Path) -> set[str]:
    """Every module this one imports: `from package import module` names the module."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names
                         if f"{target}.{alias.name}" in MODULES)
    return found


def test_every_module_is_in_a_layer() -> None:
    assert f"{PACKAGE}.store.db" in MODULES and len(MODULES) > 40  # the walk found the package
    for name in MODULES:
        assert _group(name) in LAYERS


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_and_faces_stay_apart(name: str) -> None:
    group = _group(name)
    wrong = []
    for imported in sorted(_imports(name, MODULES[name])):
        if imported.split(".")[0] in FRAMEWORKS and group.startswith(FRAMEWORK_FREE):
            wrong.append(f"{imported} (a framework, in {group})")
        if imported != PACKAGE and not imported.startswith(PACKAGE + "."):
            continue
        target = _group(imported)
        if LAYERS[target] > LAYERS[group]:
            wrong.append(f"{imported} (layer {target}, above {group})")
        elif group in FACES and target in FACES and target != group:
            wrong.append(f"{imported} (the other face)")
    assert wrong == [], f"{name} imports {wrong}"
