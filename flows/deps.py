"""dvc.yaml's code deps, derived from the import graph: `dvc repro` reruns exactly what a change affects.

Each stage's code deps are the project modules (under flows/, tasks/, model/) that its stage module
tasks/<stage>.py imports, transitively: top-level imports and lazy imports inside functions alike. Imports
under `if TYPE_CHECKING:` are left out (they never run). A package's `__init__.py` counts only when the
package itself is imported (`import model`), not when one of its modules is.

    llmpipe deps            # exit 1 and show the difference when dvc.yaml disagrees with the code
    llmpipe deps --write    # rewrite the code deps in dvc.yaml (data deps, comments and order kept)

The data deps of a stage (its input files, `${...}` paths) are whatever else dvc.yaml lists; they are
kept as written, before the code deps.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from ruamel.yaml import YAML

from tasks.core.io import atomic_file
from tasks.core.stages import STAGES

#: Top-level packages that are this project's code; everything else is a third-party or stdlib import.
PROJECT_PACKAGES = ("flows", "tasks", "model")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.Module) -> Iterator[str]:
    """Dotted names this module imports anywhere (functions included), skipping `if TYPE_CHECKING:` blocks.
    `from a.b import c` yields `a.b.c` (c may be a module or a name inside a.b: `resolve` decides)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def resolve(name: str, root: Path) -> Path | None:
    """The project file a dotted import name runs: the longest prefix that is a module or a package
    (`tasks.core.io.atomic_file` → tasks/core/io.py; `model` → model/__init__.py); None outside it."""
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    for end in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:end])
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py").relative_to(root)
        if (base / "__init__.py").is_file():
            return (base / "__init__.py").relative_to(root)
    return None


def module_deps(module: Path, root: Path) -> list[str]:
    """`module` and every project module it imports, transitively, as sorted POSIX paths from `root`."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse((root / path).read_text(encoding="utf-8"), filename=str(path))
        for name in _imported_names(tree):
            target = resolve(name, root)
            if target is not None and target not in seen:
                todo.append(target)
    return sorted(path.as_posix() for path in seen)


def _is_code(dep: str) -> bool:
    return dep.endswith(".py") and dep.split("/", 1)[0] in PROJECT_PACKAGES


def stage_code_deps(root: Path) -> dict[str, list[str]]:
    """{stage: its code deps} for every stage in the one stage list."""
    return {name: module_deps(stage.path, root) for name, stage in STAGES.items()}


def _load(root: Path) -> tuple[YAML, dict]:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    with open(root / "dvc.yaml", encoding="utf-8") as handle:
        return yaml, yaml.load(handle)


def differences(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """{stage: (missing code deps, extra code deps)} where dvc.yaml disagrees with the import graph."""
    _, document = _load(root)
    wanted = stage_code_deps(root)
    found: dict[str, tuple[list[str], list[str]]] = {}
    for name, spec in document["stages"].items():
        listed = {dep for dep in spec.get("deps", []) if _is_code(str(dep))}
        expected = set(wanted.get(name, []))
        if listed != expected:
            found[name] = (sorted(expected - listed), sorted(listed - expected))
    return found


def write(root: Path) -> list[str]:
    """Rewrite the code deps of every stage in dvc.yaml (data deps first, as written); returns the stages
    whose deps changed."""
    yaml, document = _load(root)
    wanted = stage_code_deps(root)
    changed = []
    for name, spec in document["stages"].items():
        deps = spec.get("deps", [])
        data = [dep for dep in deps if not _is_code(str(dep))]
        new = data + wanted.get(name, [])
        if list(deps) != new:
            del deps[:]
            deps.extend(new)
            changed.append(name)
    if changed:
        with atomic_file(root / "dvc.yaml") as handle:
            yaml.dump(document, handle)
    return changed
