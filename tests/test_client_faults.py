"""``qdworker.Queue`` rides out a broken connection by itself: a restarted server, a terminated
backend, a server that is down, a statement cut off mid-flight, a black-holed network.

A Postgres server of the module's own (``qdworker.testing.PostgresServer``), a fresh migrated
database per test, faults injected for real, no mocks. The queue logs in as a role with a
password, and no error message may show it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from qdworker import Queue
from qdworker.errors import DatabaseError, DatabaseUnavailableError, OutcomeUnknownError
from qdworker.testing import PostgresServer, TcpProxy, TestDatabases, terminate_backends

T = TypeVar("T")

PASSWORD = "sekret"
#: The ``application_name`` of a Queue's connection.
CLIENT = "qdworker-client"
#: The key of the tag rule's advisory lock (``qdworker_before_insert``, migration 0004).
TAG_LOCK_KEY = 1902270661
#: Bound of every wait on an outcome (far above what any of them takes when all is well).
WAIT_SECONDS = 20


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with PostgresServer.create() as pg:
        pg.start()
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE u LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        yield pg


@pytest.fixture(scope="module")
def databases(server: PostgresServer) -> TestDatabases:
    databases = TestDatabases(server.url())
    databases.create_template()
    return databases


@pytest.fixture
def admin(databases: TestDatabases) -> Iterator[str]:
    """A fresh migrated database (superuser ``postgres``, no password: for the test's checks)."""
    with databases.clone() as url:
        yield url


@pytest.fixture
def url(admin: str, server: PostgresServer) -> str:
    """The same database, as the queue uses it: role ``u`` with its password in the URL."""
    dbname = conninfo_to_dict(admin)["dbname"]
    return f"postgresql://u:{PASSWORD}@{server.host}:{server.port}/{dbname}"


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=3) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def job_ids(url: str) -> list[int]:
    return [row["id"] for row in query(url, "SELECT id FROM worker_jobs ORDER BY id")]


def client_backends(url: str, state: str | None = None) -> list[dict[str, Any]]:
    """The queue's server sessions on this database (``wait_event_type`` = 'Lock': blocked)."""
    return query(
        url,
        "SELECT pid, state, wait_event_type FROM pg_stat_activity"
        " WHERE application_name = %s AND datname = current_database()",
        (CLIENT,),
    )


def process_gone(pid: int) -> bool:
    """The backend process exited (and so closed its socket): gone, or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def until(check: Callable[[], T], what: str) -> T:
    """Poll ``check`` until it returns something true; fail after :data:`WAIT_SECONDS`. A
    bounded wait on an outcome, not a sleep."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_SECONDS} s waiting for {what}")
        await trio.sleep(0.02)
    return value


async def terminate_client(admin: str) -> None:
    """``pg_terminate_backend`` on the queue's idle connection, and wait until the backend
    process has exited: the server has closed the connection before the queue's next call."""
    pids = [row["pid"] for row in client_backends(admin)]
    assert len(pids) == 1, pids
    assert terminate_backends(admin, application_name=CLIENT) == 1
    await until(lambda: all(process_gone(pid) for pid in pids), "the backend to exit")


def assert_no_password(exc: BaseException) -> None:
    """Neither the error nor any exception it was raised from shows the password."""
    seen: BaseException | None = exc
    while seen is not None:
        assert PASSWORD not in str(seen) and PASSWORD not in repr(seen), repr(seen)
        seen = seen.__cause__ or seen.__context__


async def blocked_call(
    nursery: trio.Nursery, admin: str, call: Callable[[], Any]
) -> dict[str, Any]:
    """Start ``call`` (a queue call that will wait on a lock the test holds) in the background
    and return once its statement is blocked on the server; ``outcome`` gets its result
    (``value``) or its exception (``error``)."""
    outcome: dict[str, Any] = {"done": trio.Event()}

    async def run() -> None:
        try:
            outcome["value"] = await call()
        except DatabaseError as exc:
            outcome["error"] = exc
        finally:
            outcome["done"].set()

    nursery.start_soon(run)
    await until(
        lambda: [r for r in client_backends(admin) if r["wait_event_type"] == "Lock"],
        "the queue's statement to block on the lock",
    )
    return outcome


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_next_submit_works_after_a_restart(
    server: PostgresServer, admin: str, url: str, mode: Literal["fast", "immediate"]
) -> None:
    async with Queue(url) as queue:
        before = await queue.submit_job(type="x")
        server.restart(mode)
        # The queue's connection died with the server: the call reconnects by itself.
        after = await queue.submit_job(type="x")
    assert job_ids(admin) == [before.id, after.id]


async def test_next_calls_work_after_the_backend_was_terminated(admin: str, url: str) -> None:
    async with Queue(url) as queue:
        first = await queue.submit_job(type="x")
        await terminate_client(admin)
        second = await queue.submit_job(type="x")
        await terminate_client(admin)
        got = await queue.get_job(first.id)
    assert got is not None and got.id == first.id
    assert job_ids(admin) == [first.id, second.id]


async def test_server_down_raises_unavailable_at_once_and_the_same_queue_works_after(
    server: PostgresServer, admin: str, url: str
) -> None:
    async with Queue(url) as queue:
        before = await queue.submit_job(type="x")
        with server.down():
            for attempt in range(2):  # with the old connection, then with none at all
                started = time.monotonic()
                with pytest.raises(DatabaseUnavailableError) as caught:
                    await queue.submit_job(type="x", tag=f"during-outage-{attempt}")
                elapsed = time.monotonic() - started
                message = str(caught.value)
                assert message.startswith("cannot connect to postgresql://u:***@"), message
                assert "Connection refused" in message and "is Postgres running?" in message
                assert_no_password(caught.value)
                # A refused connection is known at once; a defect would wait for the connect
                # timeout or the client deadline (10 s, 12 s).
                assert elapsed < 5, elapsed
            with pytest.raises(DatabaseUnavailableError) as refused:
                await Queue(url).open()
            assert_no_password(refused.value)
        # The same Queue object, not reopened: it reconnects by itself.
        after = await queue.submit_job(type="x")
    # Nothing was written during the outage.
    assert job_ids(admin) == [before.id, after.id]


async def test_statement_cut_off_by_a_terminated_backend_is_outcome_unknown(
    admin: str, url: str
) -> None:
    async with Queue(url) as queue:
        first = await queue.submit_job(type="x")  # the connection is open and used
        with psycopg.connect(admin) as holder:  # a transaction holding the tag rule's lock
            holder.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext('some-tag'))", (TAG_LOCK_KEY,)
            )
            async with trio.open_nursery() as nursery:
                outcome = await blocked_call(
                    nursery, admin, lambda: queue.submit_job(type="x", tag="some-tag")
                )
                assert terminate_backends(admin, application_name=CLIENT) == 1
                with trio.fail_after(10):
                    await outcome["done"].wait()
            holder.rollback()
        error = outcome.get("error")
        assert isinstance(error, OutcomeUnknownError), outcome
        assert "whether it was committed is unknown" in str(error), str(error)
        assert_no_password(error)
        # The queue goes on with a new connection.
        again = await queue.submit_job(type="x", tag="some-tag")
    # The cut-off INSERT died with its backend (rolled back): here the outcome was "not written".
    assert job_ids(admin) == [first.id, again.id]


async def test_black_holed_network_is_outcome_unknown_within_the_client_deadline(
    server: PostgresServer, admin: str, url: str
) -> None:
    with TcpProxy(server.host, server.port) as proxy:
        async with Queue(proxy.url(url), db_timeout=1) as queue:
            await queue.submit_job(type="x")
            proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(OutcomeUnknownError) as caught, trio.fail_after(20):
                await queue.submit_job(type="x", tag="lost-in-the-hole")
            elapsed = time.monotonic() - started
            # The client deadline is db_timeout + 2 s = 3 s; TCP alone would wait for hours.
            assert "did not answer within 3 s" in str(caught.value), str(caught.value)
            assert 2.5 < elapsed < 6, elapsed
            assert_no_password(caught.value)
            # A new connection through the black hole fails after connect_timeout (2 s):
            # nothing was sent, and the message names the cause but not the password
            # (the URL through the proxy is a conninfo string, password=...).
            with pytest.raises(DatabaseUnavailableError) as unreachable, trio.fail_after(20):
                await queue.get_job(1)
            message = str(unreachable.value)
            assert "password=***" in message and "timeout expired" in message, message
            assert_no_password(unreachable.value)
            proxy.restore()
            after = await queue.submit_job(type="x")
    # The outcome really was unknown: the cut-off INSERT was held in the network, and was
    # delivered and committed once the network forwarded again.
    rows = query(admin, "SELECT id, tag FROM worker_jobs WHERE tag = 'lost-in-the-hole'")
    assert len(rows) == 1 and rows[0]["id"] < after.id, rows


async def test_get_job_is_retried_when_its_connection_breaks_mid_statement(
    admin: str, url: str
) -> None:
    async with Queue(url) as queue:
        job = await queue.submit_job(type="x")
        with psycopg.connect(admin) as holder:
            holder.execute("LOCK TABLE worker_jobs IN ACCESS EXCLUSIVE MODE")
            async with trio.open_nursery() as nursery:
                outcome = await blocked_call(nursery, admin, lambda: queue.get_job(job.id))
                [blocked] = client_backends(admin)
                assert terminate_backends(admin, application_name=CLIENT) == 1
                # The retry (on a new connection) waits for the same lock until it is freed.
                await until(
                    lambda: (
                        outcome["done"].is_set()
                        or [r for r in client_backends(admin) if r["pid"] != blocked["pid"]]
                    ),
                    "the retry's connection",
                )
                holder.rollback()
                with trio.fail_after(10):
                    await outcome["done"].wait()
    assert "error" not in outcome, outcome
    assert outcome["value"] == job


async def test_cancel_job_is_retried_when_its_connection_breaks_mid_statement(
    admin: str, url: str
) -> None:
    async with Queue(url) as queue:
        job = await queue.submit_job(type="x")
        with psycopg.connect(admin) as holder:
            holder.execute("SELECT id FROM worker_jobs WHERE id = %s FOR UPDATE", (job.id,))
            async with trio.open_nursery() as nursery:
                outcome = await blocked_call(
                    nursery, admin, lambda: queue.cancel_job(job.id, "not needed")
                )
                [blocked] = client_backends(admin)
                assert terminate_backends(admin, application_name=CLIENT) == 1
                await until(
                    lambda: (
                        outcome["done"].is_set()
                        or [r for r in client_backends(admin) if r["pid"] != blocked["pid"]]
                    ),
                    "the retry's connection",
                )
                holder.rollback()
                with trio.fail_after(10):
                    await outcome["done"].wait()
    assert "error" not in outcome, outcome
    assert outcome["value"] == "cancelled"
    [row] = query(
        admin,
        "SELECT finished IS NOT NULL AS finished, success, cancel_requested_at IS NOT NULL AS"
        " cancel_requested FROM worker_jobs WHERE id = %s",
        (job.id,),
    )
    assert row == {"finished": True, "success": False, "cancel_requested": True}
