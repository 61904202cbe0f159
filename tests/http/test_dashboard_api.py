"""The dashboard's JSON API against a real supervisor and database: who may read and act,
keyset paging, filters, the job page, the actions, and the live signal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import trio
from waiting import wait_until_async

from qdworker import Config, Manager, serve
from qdworker._benchmark import jobs as _bench_jobs  # noqa: F401  (the noop type)
from qdworker._events.tokens import mint
from qdworker.testing import InlineWorker

SECRET = "dashboard-test-secret-0123456789abcdef"
ADMIN = {"authorization": f"Bearer {mint(SECRET, 1, 3600, admin=True)}"}
VIEWER = {"authorization": f"Bearer {mint(SECRET, 2, 3600, viewer=True)}"}
ACTION = {"x-qdworker-action": "1", **ADMIN}


@asynccontextmanager
async def dashboard(db_url: str, workers: int = 0) -> AsyncIterator[httpx.AsyncClient]:
    config = Config(
        database_url=db_url, worker_count=workers, ws_enabled=False, http_port=0, ws_secret=SECRET
    )
    async with trio.open_nursery() as nursery:
        manager: Manager = await nursery.start(serve, config)
        base = f"http://127.0.0.1:{manager.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            yield client
        await manager.shutdown(immediate=True)


def insert(sql: psycopg.Connection[Any], values: str) -> list[int]:
    rows = sql.execute(
        f"INSERT INTO worker_jobs (type, data, queue, user_id, tag) VALUES {values} RETURNING id"
    ).fetchall()
    return [r["id"] for r in rows]


async def test_reads_need_a_token_and_actions_the_admin_role(db_url: str, sql: Any) -> None:
    [job_id] = insert(sql, "('t', '{}', 'default', 0, NULL)")
    async with dashboard(db_url) as client:
        assert (await client.get("/")).status_code == 200  # the page itself is public
        assert (await client.get("/api/jobs")).status_code == 401
        bad = {"authorization": "Bearer nonsense"}
        assert (await client.get("/api/jobs", headers=bad)).status_code == 401
        assert (await client.get("/api/jobs", headers=VIEWER)).status_code == 200
        me = (await client.get("/api/me", headers=VIEWER)).json()
        assert me == {"user_id": 2, "admin": False, "viewer": True, "development": False}

        body = {"filters": {"id": job_id}}
        viewer_act = {"x-qdworker-action": "1", **VIEWER}
        refused = await client.post("/api/actions/cancel", json=body, headers=viewer_act)
        assert refused.status_code == 403, refused.text
        no_header = await client.post("/api/actions/cancel", json=body, headers=ADMIN)
        assert no_header.status_code == 403
        cross = {**ACTION, "origin": "http://evil.example"}
        assert (
            await client.post("/api/actions/cancel", json=body, headers=cross)
        ).status_code == 403
        get = await client.get("/api/actions/cancel", headers=ACTION)
        assert get.status_code == 405
        unchanged = sql.execute("SELECT finished FROM worker_jobs WHERE id = %s", [job_id])
        assert unchanged.fetchone()["finished"] is None

        done = await client.post("/api/actions/cancel", json=body, headers=ACTION)
        assert done.status_code == 200, done.text
        assert done.json()["touched"] == 1
        row = sql.execute(
            "SELECT success, result FROM worker_jobs WHERE id = %s", [job_id]
        ).fetchone()
        assert row["success"] is False and row["result"]["error_type"] == "JobCancelled"


async def test_keyset_pages_and_filters(db_url: str, sql: Any) -> None:
    sql.execute(
        "INSERT INTO worker_jobs (type, queue, user_id, data, concurrency_key)"
        " SELECT CASE WHEN i % 10 = 0 THEN 'rare' ELSE 'common' END,"
        "        CASE WHEN i % 2 = 0 THEN 'even' ELSE 'odd' END, i % 3,"
        "        jsonb_build_object('n', i, 'word', 'needle' || i), 'k' || (i % 4)"
        "   FROM generate_series(1, 250) AS i"
    )
    async with dashboard(db_url) as client:
        seen: list[int] = []
        before: int | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"size": 40, "queue": "even"}
            if before is not None:
                params["before"] = before
            page = (await client.get("/api/jobs", params=params, headers=VIEWER)).json()
            seen += [j["id"] for j in page["jobs"]]
            assert all(j["queue"] == "even" for j in page["jobs"])
            pages += 1
            before = page["next"]
            if before is None:
                break
        assert pages == 4  # 125 rows, 40 a page
        assert seen == sorted(seen, reverse=True) and len(set(seen)) == 125

        async def ids(**params: Any) -> list[int]:
            answer = await client.get("/api/jobs", params={"size": 500, **params}, headers=VIEWER)
            assert answer.status_code == 200, answer.text
            return [j["id"] for j in answer.json()["jobs"]]

        assert len(await ids(type="rare")) == 25
        assert len(await ids(type="rare", queue="odd")) == 0
        assert len(await ids(user_id=1)) == 84
        assert len(await ids(concurrency_key="k2")) == 63
        [hit] = await ids(text="NEEDLE137")
        assert (
            sql.execute("SELECT data->>'n' AS n FROM worker_jobs WHERE id = %s", [hit]).fetchone()[
                "n"
            ]
            == "137"
        )
        assert len(await ids(state="pending", type="rare")) == 25
        assert await ids(state="succeeded", type="rare") == []
        window = {"since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"}
        assert len(await ids(type="rare", **window)) == 25
        assert await ids(type="rare", until="2000-01-01T00:00:00Z") == []
        bad = await client.get("/api/jobs", params={"state": "nope"}, headers=VIEWER)
        assert bad.status_code == 400 and "state" in bad.text
        count = (
            await client.get("/api/jobs/count", params={"type": "rare"}, headers=VIEWER)
        ).json()
        assert count == {"count": 25, "more": False, "limit": 10000}


async def test_job_page_shows_every_column_and_the_chain(db_url: str, sql: Any) -> None:
    [first] = insert(sql, "('flaky', '{\"x\": 1}', 'default', 0, 'chain')")
    sql.execute(
        "UPDATE worker_jobs SET started = now(), finished = now(), success = false,"
        ' result = \'{"error": "boom", "error_type": "RuntimeError"}\', dead_at = now()'
        " WHERE id = %s",
        [first],
    )
    second = sql.execute("SELECT qdworker_retry_job(%s) AS id", [first]).fetchone()["id"]
    async with dashboard(db_url) as client:
        page = (await client.get(f"/api/jobs/{second}", headers=VIEWER)).json()
        columns = {r["column_name"] for r in sql.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'worker_jobs'")}  # fmt: skip
        assert set(page["job"]) == columns
        assert page["job"]["data"] == {"x": 1}
        assert [a["id"] for a in page["chain"]] == [first, second]
        assert page["chain"][0]["error"] == "boom"
        assert (await client.get("/api/jobs/999999", headers=VIEWER)).status_code == 404


async def test_failures_are_grouped_and_retried_in_bulk(db_url: str, sql: Any) -> None:
    ids = insert(
        sql,
        ", ".join(
            ["('mail', '{}', 'default', 0, NULL)"] * 3 + ["('sms', '{}', 'default', 0, NULL)"]
        ),
    )
    sql.execute(
        "UPDATE worker_jobs SET started = now(), finished = now(), success = false, dead_at = now(),"
        " result = jsonb_build_object('error', 'down: ' || type, 'error_type', 'IOError')"
        " WHERE id = ANY(%s)",
        [ids],
    )
    async with dashboard(db_url) as client:
        groups = (await client.get("/api/failures", headers=VIEWER)).json()["rows"]
        assert {(g["type"], g["error"], g["jobs"]) for g in groups} == {
            ("mail", "down: mail", 3), ("sms", "down: sms", 1)}  # fmt: skip
        body = {
            "filters": {
                "state": "dead",
                "type": "mail",
                "error_type": "IOError",
                "error": "down: mail",
            }
        }
        done = (await client.post("/api/actions/retry", json=body, headers=ACTION)).json()
        assert done["touched"] == 3 and all(r["new_id"] for r in done["results"])
        left = (await client.get("/api/failures", headers=VIEWER)).json()["rows"]
        assert [(g["type"], g["jobs"]) for g in left] == [("sms", 1)]
        deleted = await client.post(
            "/api/actions/delete", json={"filters": {"state": "dead"}}, headers=ACTION
        )
        assert deleted.json()["touched"] == 1
        assert (
            sql.execute(
                "SELECT count(*) AS n FROM worker_jobs WHERE dead_at IS NOT NULL"
            ).fetchone()["n"]
            == 0
        )


async def test_queues_pause_and_cron_run_now(db_url: str, sql: Any) -> None:
    [cron_id] = insert(sql, "('tick', '{}', 'slow', 0, 'cron:tick')")
    sql.execute(
        "UPDATE worker_jobs SET cron_schedule = '0 0 * * *', due = now() + interval '1 day' WHERE id = %s",
        [cron_id],
    )
    async with dashboard(db_url) as client:
        queues = (await client.get("/api/queues", headers=VIEWER)).json()["rows"]
        slow = [(q["scheduled"], q["paused"]) for q in queues if q["name"] == "slow"]
        assert slow == [(1, False)]
        paused = await client.post("/api/queues/slow/pause", json={"paused": True}, headers=ACTION)
        assert paused.status_code == 200, paused.text
        assert sql.execute("SELECT paused FROM worker_queues WHERE name = 'slow'").fetchone()[
            "paused"
        ]
        cron = (await client.get("/api/cron", headers=VIEWER)).json()["rows"]
        assert [c["lag_seconds"] for c in cron if c["id"] == cron_id] == [0]
        ran = await client.post(f"/api/cron/{cron_id}/run", json={}, headers=ACTION)
        assert ran.status_code == 200, ran.text
        due = sql.execute(
            "SELECT due <= now() AS due FROM worker_jobs WHERE id = %s", [cron_id]
        ).fetchone()
        assert due["due"]
        assert (await client.post("/api/cron/999/run", json={}, headers=ACTION)).status_code == 404


async def test_overview_reads_throughput_pickup_and_workers(db_url: str, sql: Any) -> None:
    sql.execute(
        "INSERT INTO qdworker_throughput (bucket, supervisor, queue, type, started, succeeded, failed, pickup_ms_hist)"
        " VALUES (date_trunc('minute', now()), 's1', 'default', 't', 10, 8, 2, '{0,0,0,5,0,0,0,0,0,0,0,0,0,0,0,0,5}'),"
        "        (date_trunc('minute', now()), 's2', 'default', 't', 1, 1, 0, '{1}')"
    )
    async with dashboard(db_url, workers=1) as client:
        d = (await client.get("/api/overview", headers=VIEWER)).json()
        [bucket] = d["throughput"]
        assert (bucket["succeeded"], bucket["failed"]) == (9, 2)
        assert d["pickup"]["p50_ms"] == 10 and d["pickup"]["p95_ms"] is None
        assert d["pickup"]["over_last_bound"] == ["p95_ms"]

        async def listed() -> Any:
            workers = (await client.get("/api/workers", headers=VIEWER)).json()
            return workers if workers["workers"] else None

        with trio.fail_after(15):
            workers = await wait_until_async(listed)
        assert workers["supervisors"] and workers["workers"][0]["pid"] > 0


async def test_live_signals_an_insert(db_url: str, sql: Any) -> None:
    async with dashboard(db_url) as client:
        with trio.fail_after(10):
            async with client.stream("GET", "/api/live", headers=VIEWER) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.aiter_lines()
                assert (await anext(lines)).startswith("retry:")
                await trio.sleep(0.5)  # the feed's LISTEN is in place
                insert(sql, "('t', '{}', 'default', 0, NULL)")
                async for line in lines:
                    if line == "event: change":
                        break
        assert (await client.get("/api/live")).status_code == 401


def test_the_cli_mints_viewer_tokens() -> None:
    import os
    import subprocess
    import sys

    from qdworker._events.tokens import verify

    env = {**os.environ, "QDWORKER_WS_SECRET": SECRET}
    argv = [sys.executable, "-m", "qdworker", "token", "--user", "3", "--viewer"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
    identity = verify(SECRET, done.stdout.strip())
    assert (identity.user_id, identity.viewer, identity.admin) == (3, True, False)
    both = subprocess.run([*argv, "--admin"], env=env, capture_output=True, text=True, timeout=60)
    assert both.returncode != 0 and "exclude" in both.stderr


async def test_an_open_live_stream_does_not_hold_up_shutdown(db_url: str) -> None:
    from qdworker._http.server import GRACEFUL_SECONDS

    config = Config(
        database_url=db_url, worker_count=0, ws_enabled=False, http_port=0, ws_secret=SECRET
    )
    async with trio.open_nursery() as nursery:
        manager: Manager = await nursery.start(serve, config)
        base = f"http://127.0.0.1:{manager.http_port}"
        async with (
            httpx.AsyncClient(base_url=base) as client,
            client.stream("GET", "/api/live", headers=VIEWER) as stream,
        ):
            assert (await anext(stream.aiter_lines())).startswith("retry:")
            began = trio.current_time()
            with trio.fail_after(GRACEFUL_SECONDS + 5):
                await manager.shutdown()
            assert trio.current_time() - began < GRACEFUL_SECONDS + 2


async def test_live_signals_are_debounced(db_url: str, sql: Any) -> None:
    from qdworker._http._live import DEBOUNCE_SECONDS

    window = 1.5
    async with (
        dashboard(db_url) as client,
        client.stream("GET", "/api/live", headers=VIEWER) as stream,
    ):
        lines = stream.aiter_lines()
        assert (await anext(lines)).startswith("retry:")
        await trio.sleep(0.5)  # the feed's LISTEN is in place
        changes = 0

        async def count() -> None:
            nonlocal changes
            async for line in lines:
                changes += line == "event: change"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(count)
            began = trio.current_time()
            while trio.current_time() - began < window:  # ~a hundred inserts, one at a time
                insert(sql, "('t', '{}', 'default', 0, NULL)")
                await trio.sleep(0.01)
            await trio.sleep(DEBOUNCE_SECONDS * 2)
            nursery.cancel_scope.cancel()
    assert 2 <= changes <= window / DEBOUNCE_SECONDS + 3, changes


async def test_development_mode_needs_no_token_on_loopback(db_url: str, sql: Any) -> None:
    [job_id] = insert(sql, "('t', '{}', 'default', 0, NULL)")
    config = Config(database_url=db_url, worker_count=0, ws_enabled=False, http_port=0)
    async with trio.open_nursery() as nursery:
        manager: Manager = await nursery.start(serve, config)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{manager.http_port}") as client:
            me = (await client.get("/api/me")).json()
            assert me == {"user_id": 0, "admin": True, "viewer": True, "development": True}
            action = {"x-qdworker-action": "1"}
            done = await client.post(
                "/api/actions/cancel", json={"filters": {"id": job_id}}, headers=action
            )
            assert done.json()["touched"] == 1
            # A page that pointed its own DNS name at 127.0.0.1 is still refused.
            rebound = await client.get(
                "/api/jobs", headers={"host": f"evil.example:{manager.http_port}"}
            )
            assert rebound.status_code == 403
        await manager.shutdown(immediate=True)


async def test_live_signals_a_run_ending_and_costs_the_workers_no_events(
    db_url: str, sql: Any
) -> None:
    """A job that a worker runs and finishes (no insert meanwhile) signals the open page; the
    open page is not a websocket client: nobody asks the workers for job events."""
    [job_id] = insert(sql, "('qdworker.bench.noop', '{}', 'default', 0, NULL)")
    config = Config(database_url=db_url, worker_count=0, ws_enabled=False, http_port=0,
                    ws_secret=SECRET, jobs=("qdworker._benchmark.jobs",))  # fmt: skip
    async with trio.open_nursery() as nursery:
        manager: Manager = await nursery.start(serve, config)
        base = f"http://127.0.0.1:{manager.http_port}"
        async with (
            httpx.AsyncClient(base_url=base, timeout=10) as client,
            client.stream("GET", "/api/live", headers=VIEWER) as stream,
        ):
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("retry:")
            await trio.sleep(2.5)  # the feed reads the write count once; the insert is counted
            async with InlineWorker(db_url, types=["qdworker.bench.noop"]) as worker:
                assert len(await worker.run_until_idle()) == 1
            assert sql.execute(
                "SELECT finished FROM worker_jobs WHERE id = %s", [job_id]
            ).fetchone()["finished"]
            assert manager.hub.client_count == 0
            with trio.fail_after(5):
                async for line in lines:
                    if line == "event: change":
                        break
        await manager.shutdown(immediate=True)
