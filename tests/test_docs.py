"""README.rst stays true: it parses, starts with the two commands CI runs, and documents every
setting and every worker_jobs column."""

from __future__ import annotations

from pathlib import Path

import docutils.core
import psycopg

from qdworker import config
from qdworker.model import COLUMNS

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
