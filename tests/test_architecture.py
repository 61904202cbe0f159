"""The house rules: docs/architecture.md names only files that exist, and the package keeps
its layering and sizes (the figures ``python tools/house_metrics.py`` prints)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qdworker"


def _house_metrics() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "house_metrics", ROOT / "tools" / "house_metrics.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["house_metrics"] = module
    spec.loader.exec_module(module)
    return module


metrics = _house_metrics()


def test_every_path_the_architecture_names_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:qdworker|sql|tools|tests)/[\w/.]*)`", text))
    assert len(named) > 40  # the map names the modules on the path
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_every_room_has_a_layer_and_the_map_lists_it() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for path in PACKAGE.iterdir():
        if path.name == "__pycache__" or path.suffix not in ("", ".py"):
            continue
        assert metrics.room(PACKAGE, path) in metrics.LAYERS, path.name
        shown = f"`qdworker/{path.name}/`" if path.is_dir() else f"`qdworker/{path.name}`"
        assert shown in text, f"docs/architecture.md's layers do not list {shown}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one() -> None:
    assert metrics.upward_imports(PACKAGE) == []


def test_modules_and_functions_stay_small() -> None:
    assert metrics.long_modules(PACKAGE) == []
    assert metrics.long_functions(PACKAGE) == []
