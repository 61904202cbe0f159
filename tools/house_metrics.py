"""Structure figures of the package: modules over 400 lines, functions over 60 lines, and
imports that run from a lower layer to a higher one (the layers are drawn in
docs/architecture.md and checked by tests/test_architecture.py).

    python tools/house_metrics.py [PACKAGE_DIR]    # default: qdworker/ next to this folder
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

#: Layers, low to high: a module may import its own layer and the ones below. Keys are the
#: package's top-level modules and folders, without their leading underscore.
LAYERS: dict[str, int] = {
    "redact": 0, "net": 0, "errors": 0, "model": 0, "version": 0,
    "config": 1, "logs": 1, "registry": 1, "schedule": 1, "protocol": 1, "tracing": 1,
    "db": 2, "devdb": 2,
    "client": 3, "queues": 3, "fields": 2,
    "jobs": 4, "web3": 4,
    "worker": 5, "events": 5,
    "supervisor": 6, "http": 6,
    "cli": 7, "benchmark": 7, "testing": 7, "django": 7,
    "__init__": 8, "__main__": 8,
}  # fmt: skip
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def plain(name: str) -> str:
    """``name`` without the underscore that marks it private (``__init__`` stays)."""
    return name[1:] if name.startswith("_") and not name.startswith("__") else name


def room(package: Path, path: Path) -> str:
    """The top-level module or folder ``path`` belongs to (without a leading underscore)."""
    return plain(path.relative_to(package).parts[0].removesuffix(".py"))


def imported_rooms(package: Path, path: Path) -> set[str]:
    """The package's top-level rooms that ``path`` imports."""
    name = package.name
    tree = ast.parse(path.read_text(encoding="utf-8"))
    depth = len(path.relative_to(package).parts) - 1
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == name and len(parts) > 1:
                    found.add(plain(parts[1]))
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")
            if node.level == 0:
                if module[0] == name:
                    targets = module[1:2] or [alias.name for alias in node.names]
                    found.update(plain(t) for t in targets)
            elif node.level > depth:  # relative import of another top-level room
                targets = module[:1] if module[0] else [alias.name for alias in node.names]
                found.update(plain(t) for t in targets)
    return found


def upward_imports(package: Path) -> list[tuple[str, str]]:
    pairs = []
    for path in sorted(package.rglob("*.py")):
        here = room(package, path)
        for there in sorted(imported_rooms(package, path)):
            if there != here and LAYERS.get(there, -1) > LAYERS.get(here, 99):
                pairs.append((str(path.relative_to(package.parent)), there))
    return pairs


def long_modules(package: Path) -> list[tuple[str, int]]:
    return [
        (str(p.relative_to(package.parent)), n)
        for p in sorted(package.rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]


def long_functions(package: Path) -> list[tuple[str, str, int]]:
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append((str(path.relative_to(package.parent)), node.name, lines))
    return found


def main() -> None:
    package = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent.parent / "qdworker"
    modules, functions = long_modules(package), long_functions(package)
    upward = upward_imports(package)
    print(f"modules over {MAX_MODULE_LINES} lines: {len(modules)}")
    for path, n in modules:
        print(f"  {path} ({n})")
    print(f"functions over {MAX_FUNCTION_LINES} lines: {len(functions)}")
    for path, name, n in functions:
        print(f"  {path}:{name} ({n})")
    print(f"imports from a lower layer to a higher one: {len(upward)}")
    for path, there in upward:
        print(f"  {path} -> {there}")


if __name__ == "__main__":
    main()
