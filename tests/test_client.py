"""The job submission API under trio and asyncio, in and out of the caller's transaction."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from qdworker import InvalidJobError, Job, Queue
from qdworker import _fields as fields
from qdworker._model import USER_FIELDS


async def test_submit_job_from_trio_stores_every_field(db_url: str) -> None:
    due = datetime.now(UTC) + timedelta(minutes=5)
    async with Queue(db_url) as queue:
        job = await queue.submit_job(
            type="sendEmail",
            data={"to": "a@b.c"},
            tag="email:42",
            user_id=42,
            due=due,
            cron_schedule="*/30 * * * * *",
            auto_reschedule_on_failure=True,
            auto_reschedule_on_failure_delay=1500,
            remove_delay=60_000,
            persistent=True,
            max_attempts=5,
            backoff="exponential",
            timeout_seconds=2.5,
        )
        assert isinstance(job, Job) and job.id > 0
        stored = await queue.get_job(job.id)
    assert stored == job
    assert (job.type, job.tag, job.user_id, job.data) == (
        "sendEmail",
        "email:42",
        42,
        {"to": "a@b.c"},
    )
    assert job.due == due and job.remove_at == due + timedelta(minutes=1)
    assert job.cron_schedule == "*/30 * * * * *" and job.persistent is True
    assert (job.auto_reschedule_on_failure, job.auto_reschedule_on_failure_delay) == (True, 1500)
    assert (job.max_attempts, job.backoff, job.timeout_seconds) == (5, "exponential", 2.5)
    assert job.status == "pending"


def test_submit_job_from_asyncio(db_url: str) -> None:
    async def main() -> list[Job]:
        async with Queue(db_url) as queue:
            one = await queue.submit_job(type="resize", data={"id": 1}, due=timedelta(seconds=30))
            many = await queue.submit_jobs([{"type": "a"}, {"type": "b", "tag": "t"}])
            return [one, *many]

    jobs = asyncio.run(main())
    assert [j.type for j in jobs] == ["resize", "a", "b"]
    assert jobs[0].due - jobs[0].created_at == timedelta(seconds=30)  # database clock


async def test_submit_jobs_is_one_statement_in_order(db_url: str) -> None:
    async with Queue(db_url) as queue:
        jobs = await queue.submit_jobs({"type": "n", "data": {"i": i}} for i in range(500))
    assert [j.data["i"] for j in jobs] == list(range(500))
    assert len({j.created_at for j in jobs}) == 1  # one transaction


async def test_enqueue_inside_callers_transaction(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        async with Queue(db_url) as queue:
            await queue.submit_job(type="audit", connection=conn)
            conn.rollback()
            kept = await queue.submit_job(type="audit", data={"kept": True}, connection=conn)
            conn.commit()
            assert [j.id for j in await _all(queue)] == [kept.id]


def test_enqueue_inside_asyncio_transaction(db_url: str) -> None:
    async def main() -> int:
        conn = await psycopg.AsyncConnection.connect(db_url)
        async with conn, Queue(db_url) as queue:
            async with conn.transaction():
                await queue.submit_job(type="audit", connection=conn)
                await conn.execute("SELECT 1")
            async with conn.transaction(force_rollback=True):
                await queue.submit_job(type="audit", connection=conn)
            return len(await _all(queue))

    assert asyncio.run(main()) == 1


async def _all(queue: Queue) -> list[Job]:
    jobs = []
    for i in range(1, 100):
        job = await queue.get_job(i)
        if job is not None:
            jobs.append(job)
    return jobs


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": "x", "colour": "red"}, "unknown job field"),
        ({"type": ""}, "type must be"),
        ({"data": {}}, "type must be"),
        ({"type": "x", "data": [1]}, "data must be a JSON object"),
        ({"type": "x", "data": {"x": object()}}, "not JSON-serialisable"),
        ({"type": "x", "data": {"x": float("nan")}}, "not JSON-serialisable"),
        ({"type": "x", "cron_schedule": "every day"}, "cron schedule"),
        ({"type": "x", "cron_schedule": "61 * * * *"}, "not a valid cron"),
        ({"type": "x", "user_id": -1}, "user_id"),
        ({"type": "x", "remove_delay": 1.5}, "remove_delay"),
        ({"type": "x", "max_attempts": 0}, "max_attempts"),
        ({"type": "x", "backoff": "linear"}, "backoff"),
        ({"type": "x", "due": "tomorrow"}, "due must be"),
        ({"type": "x", "due": datetime(2030, 1, 1)}, "timezone-aware"),
        ({"type": "x", "persistent": "yes"}, "persistent"),
        ({"type": "x", "auto_reschedule_on_failure": 1}, "auto_reschedule_on_failure"),
        ({"type": "x", "tag": "   "}, "tag must be"),
        ({"type": "x", "timeout_seconds": 0}, "timeout_seconds"),
        ({"type": "x", "timeout_seconds": float("nan")}, "timeout_seconds"),
        ({"type": "x", "due": float("inf")}, "due must be"),
        ({"type": "x", "on_tag_conflict": "skip"}, "on_tag_conflict must be"),
        ({"type": "x", "on_tag_conflict": ["keep"]}, "on_tag_conflict must be"),
    ],
)
async def test_invalid_input_is_rejected_before_writing(
    db_url: str, fields: dict, message: str
) -> None:
    async with Queue(db_url) as queue:
        with pytest.raises(InvalidJobError, match=message):
            await queue.submit_job(**fields)
        with pytest.raises(InvalidJobError):
            await queue.submit_jobs([{"type": "fine"}, fields])
        assert await queue.get_job(1) is None


def test_every_user_field_is_checked() -> None:
    """A column added to USER_FIELDS without a check would be silently dropped."""
    assert {"type", "data", *fields._OPTIONAL_FIELDS} == set(USER_FIELDS)
