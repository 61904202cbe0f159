"""README.rst stays true: it parses, starts with the two commands CI runs, and documents every
setting and every worker_jobs column."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import docutils.core
import psycopg

from qdworker import _config as config
from qdworker._model import COLUMNS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.rst").read_text(encoding="utf-8")


def test_readme_is_valid_restructuredtext() -> None:
    docutils.core.publish_string(
        README, writer="null", settings_overrides={"report_level": 2, "halt_level": 2}
    )


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second() -> None:
    head = README.split("\n\n")[:3]
    assert "./dev run" in head[2] and "./dev test" in head[2]
    assert "exec ./dev test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_documents_every_setting() -> None:
    for setting in config.SETTINGS:
        assert f"``{setting.env}``" in README, setting.env
        if setting.flag_allowed:
            assert f"``{setting.flag}``" in README, setting.flag


def test_readme_documents_every_column(sql: psycopg.Connection) -> None:
    columns = [r["column_name"] for r in sql.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'worker_jobs'"
    )]  # fmt: skip
    assert sorted(columns) == sorted(COLUMNS)
    for column in columns:
        assert f"``{column}``" in README, column


def test_api_reference_is_current() -> None:
    """docs/api.md is generated from the public modules; regenerate it after changing them."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "api_reference.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_public_modules_alone_carry_all() -> None:
    """``__all__`` marks a face: the public modules, and the one private package (the embedded
    database) that re-exports its parts for the rest of qdworker."""
    faces = {"__init__.py", "errors.py", "testing/__init__.py", "testing/pytest_plugin.py",
             "web3/__init__.py", "_devdb/__init__.py"}  # fmt: skip
    package = ROOT / "qdworker"
    carrying = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "\n__all__" in path.read_text(encoding="utf-8")
    }
    assert carrying == faces


def test_private_modules_are_named_so() -> None:
    """Every module outside the public ones starts with an underscore (or lives in a folder
    that does)."""
    public = {"__init__.py", "__main__.py", "errors.py", "py.typed"}
    package = ROOT / "qdworker"
    for path in package.iterdir():
        if path.name in public or path.name.startswith("_") or path.name in ("testing", "web3"):
            continue
        raise AssertionError(f"{path.name} is neither public nor named as private")
    for folder in ("testing", "web3"):
        for path in (package / folder).glob("*.py"):
            assert path.name.startswith("_") or path.name == "pytest_plugin.py", path
