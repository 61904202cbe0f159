from __future__ import annotations

import psycopg
import pytest


@pytest.fixture
def jobs_db(db_url: str) -> str:
    """The test database plus the table the test job types record their runs in."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE test_runs (job_id bigint, worker_id text, "
            "at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
    return db_url
