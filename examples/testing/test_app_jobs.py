"""Testing an application's jobs with qdworker's test kit: a real, throwaway database per
test, the job run in the test's own process. Run: ``pytest examples/testing``."""

from __future__ import annotations

import app_jobs

import qdworker
from qdworker.testing import InlineWorker, run_jobs


async def test_sign_up_sends_a_welcome_email(
    qdworker_db_url: str, qdworker_inline: InlineWorker
) -> None:
    async with qdworker.Queue(qdworker_db_url) as queue:
        await app_jobs.sign_up(queue, 42, "ada@example.com")
    [run] = await qdworker_inline.run_due()
    assert run.succeeded and run.result == {"sent_to": "ada@example.com"}
    assert qdworker_inline.messages == [
        {"kind": "send-to-user", "user_id": 42,
         "message": {"type": "emailSent", "data": {"to": "ada@example.com"}}},
    ]  # fmt: skip


def test_the_same_from_a_plain_test(qdworker_db_url: str) -> None:
    import psycopg

    with psycopg.connect(qdworker_db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO worker_jobs (type, data) VALUES ('welcomeEmail', '{\"to\": \"b@c.d\"}')"
        )
    [run] = run_jobs(qdworker_db_url)
    assert run.job.type == "welcomeEmail" and run.result == {"sent_to": "b@c.d"}
