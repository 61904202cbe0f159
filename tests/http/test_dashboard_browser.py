"""The dashboard in a real browser (Debian's chromium through playwright) against a real
supervisor process: it loads without console errors, shows a job inserted by plain SQL within
a second without a reload, filters, shows a job's result, cancels and retries in bulk, and
refuses both to a viewer (the page says 403). Screenshots of every page go to the test's tmp
folder; with QDWORKER_UPDATE_SCREENSHOT=1 the overview also goes to docs/dashboard.png (the
README's picture), so that an ordinary run leaves the tree as it was."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from procs import ROOT, running, start_supervisor, wait_for
from psycopg.rows import dict_row
from waiting import wait_until

from qdworker._events.tokens import mint

playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("QDWORKER_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(autouse=True)
def _chromium_is_there() -> None:
    """A missing browser fails the tests (it must not pass for a skip in CI)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no chromium at {CHROMIUM}: ./dev test installs it (apt-get install -y chromium, "
            "as root), or set QDWORKER_CHROMIUM to a chromium binary"
        )


SECRET = "dashboard-browser-secret-0123456789abcdef"
ADMIN_TOKEN = mint(SECRET, 1, 3600, admin=True)
VIEWER_TOKEN = mint(SECRET, 2, 3600, viewer=True)
PAGES = ("overview", "jobs", "failures", "queues", "cron", "workers")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sql(db_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(db_url, autocommit=True, row_factory=dict_row)


@pytest.fixture
def site(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A supervisor with one worker and the dashboard on a free port; its base URL."""
    port = _free_port()
    proc = start_supervisor(
        db_url, log=tmp_path / "supervisor.log", QDWORKER_HTTP_PORT=str(port),
        QDWORKER_WS_SECRET=SECRET, WORKER_COUNT="1",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "supervisor.log").read_text()
        try:
            return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    with running(proc):
        wait_until(ready, 20, what="the dashboard's supervisor to be ready")
        yield base


@pytest.fixture
def browser() -> Iterator[Any]:
    # Once trio-asyncio is imported (qdworker's asyncio handlers), new_event_loop() outside trio
    # makes a trio-asyncio loop, which playwright's sync API cannot drive: give this thread
    # asyncio's own policy while the browser runs (trio-asyncio keeps it per thread).
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with playwright_sync.sync_playwright() as p:
            launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                yield launched
            finally:
                launched.close()
    finally:
        asyncio.set_event_loop_policy(None)


def _page(browser: Any, token: str | None, errors: list[str]) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    if token is not None:
        context.add_init_script(f"sessionStorage.setItem('qdworker.token', {token!r})")
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page


def _demo_figures(sql: psycopg.Connection[Any]) -> None:
    """An hour of throughput and pickup figures, as the supervisors would write them."""
    sql.execute(
        "INSERT INTO qdworker_throughput (bucket, supervisor, queue, type, started, succeeded,"
        "                                 failed, run_ms, pickup_ms_hist)"
        " SELECT date_bin('10 seconds', now() - i * interval '10 seconds', 'epoch'), 'demo',"
        "        'default', 'sendEmail', 60 + (i % 17) * 3, 55 + (i % 17) * 3, (i % 23 = 0)::int * 4,"
        "        2000, '{0,4,10,20,12,6,3,1,0,0,0,0,0,0,0,0,0}'"
        "   FROM generate_series(1, 359) AS i"
    )


def _wait_dead(db_url: str, ids: list[int]) -> None:
    wait_for(db_url, "SELECT dead_at FROM worker_jobs WHERE id = ANY(%s)",
             lambda rows: len(rows) == len(ids) and all(r["dead_at"] for r in rows), params=[ids])  # fmt: skip


def test_dashboard_admin(site: str, db_url: str, browser: Any, tmp_path: Path) -> None:
    errors: list[str] = []
    with _sql(db_url) as sql:
        _demo_figures(sql)
        dead = [r["id"] for r in sql.execute(
            "INSERT INTO worker_jobs (type, data, max_attempts) VALUES"
            " ('boom', '{\"message\": \"smtp down\"}', 1), ('boom', '{\"message\": \"smtp down\"}', 1)"
            " RETURNING id")]  # fmt: skip
        _wait_dead(db_url, dead)
        page = _page(browser, ADMIN_TOKEN, errors)
        page.goto(f"{site}/#/jobs")
        page.get_by_role("link", name=f"#{dead[0]}", exact=True).wait_for()
        page.locator("#live.on").wait_for()

        # Live: a job inserted by plain SQL shows up within a second, without a reload.
        [echo] = [r["id"] for r in sql.execute(
            "INSERT INTO worker_jobs (type, data) VALUES ('echo', '{\"marker\": \"live-42\"}') RETURNING id")]  # fmt: skip
        inserted = time.monotonic()
        page.get_by_role("link", name=f"#{echo}", exact=True).wait_for(timeout=1000)
        shown_after = time.monotonic() - inserted
        print(f"a job inserted by SQL was listed after {shown_after * 1000:.0f} ms")
        assert shown_after < 1.0

        # Filters find it, and only what matches.
        page.get_by_label("Type").fill("echo")
        page.get_by_label("Text in data or error").fill("LIVE-42")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_url("**/#/jobs?type=echo&text=LIVE-42")
        page.get_by_role("link", name=f"#{echo}", exact=True).wait_for()
        assert page.get_by_role("link", name=f"#{dead[0]}", exact=True).count() == 0
        page.screenshot(path=str(tmp_path / "jobs.png"), full_page=True)

        # Its page shows its result (the run finishes meanwhile: the live signal refreshes it).
        page.get_by_role("link", name=f"#{echo}", exact=True).click()
        page.locator("#job-result", has_text="live-42").wait_for(timeout=10_000)
        page.get_by_role("heading", name="Attempts").wait_for()
        page.screenshot(path=str(tmp_path / "job.png"), full_page=True)

        # Cancel one job, after a confirmation that names it.
        [later] = [r["id"] for r in sql.execute(
            "INSERT INTO worker_jobs (type, due) VALUES ('noop', now() + interval '1 hour') RETURNING id")]  # fmt: skip
        page.goto(f"{site}/#/job/{later}")
        page.get_by_role("button", name="Cancel…").click()
        page.get_by_text(f"Cancel 1 job #{later}?").wait_for()
        page.get_by_role("button", name="Confirm").click()
        wait_for(db_url, "SELECT result FROM worker_jobs WHERE id = %s",
                 lambda rows: rows[0]["result"] is not None, params=[later])  # fmt: skip
        row = sql.execute("SELECT result FROM worker_jobs WHERE id = %s", [later]).fetchone()
        assert row is not None and row["result"]["error_type"] == "JobCancelled"

        # Retry a failure group in bulk.
        page.goto(f"{site}/#/failures")
        page.get_by_role("cell", name="smtp down").wait_for()
        page.get_by_role("button", name="Retry all…").click()
        page.get_by_text("Retry 2 dead boom job(s)?").wait_for()
        page.get_by_role("button", name="Confirm").click()
        wait_for(db_url, "SELECT id FROM worker_jobs WHERE rescheduled_from_job = ANY(%s)",
                 lambda rows: len(rows) == 2, params=[dead])  # fmt: skip

        for name in PAGES:
            page.goto(f"{site}/#/{name}")
            page.get_by_role("heading", name=name.capitalize(), exact=True).wait_for()
            page.wait_for_selector("#status:has-text('Updated')")
            page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
        page.goto(f"{site}/#/overview")
        page.wait_for_selector("#status:has-text('Updated')")
        page.screenshot(path=str(tmp_path / "overview.png"))
        if os.environ.get("QDWORKER_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(tmp_path / "overview.png", ROOT / "docs" / "dashboard.png")

        phone = browser.new_context(viewport={"width": 390, "height": 800})
        phone.add_init_script(f"sessionStorage.setItem('qdworker.token', {ADMIN_TOKEN!r})")
        small = phone.new_page()
        small.goto(f"{site}/#/jobs")
        small.get_by_role("link", name=f"#{echo}", exact=True).wait_for()
        small.screenshot(path=str(tmp_path / "jobs-phone.png"), full_page=True)
    assert errors == []


def test_dashboard_viewer_is_refused_actions(site: str, db_url: str, browser: Any) -> None:
    errors: list[str] = []
    with _sql(db_url) as sql:
        [pending] = [r["id"] for r in sql.execute(
            "INSERT INTO worker_jobs (type, due) VALUES ('noop', now() + interval '1 hour') RETURNING id")]  # fmt: skip
        dead = [r["id"] for r in sql.execute(
            "INSERT INTO worker_jobs (type, max_attempts) VALUES ('boom', 1) RETURNING id")]  # fmt: skip
        _wait_dead(db_url, dead)

        page = _page(browser, None, errors)
        page.goto(f"{site}/#/job/{pending}")
        page.get_by_label("Token").fill(VIEWER_TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("user 2 · viewer").wait_for()
        page.get_by_role("heading", name=f"Job #{pending}: noop").wait_for()
        page.get_by_role("button", name="Cancel…").click()
        page.get_by_role("button", name="Confirm").click()
        page.get_by_role("alert").filter(has_text="403").wait_for()

        page.goto(f"{site}/#/failures")
        page.get_by_role("button", name="Retry all…").click()
        page.get_by_role("button", name="Confirm").click()
        page.get_by_role("alert").filter(has_text="403").wait_for()

        row = sql.execute("SELECT finished FROM worker_jobs WHERE id = %s", [pending]).fetchone()
        assert row is not None and row["finished"] is None
        retried = sql.execute(
            "SELECT count(*) AS n FROM worker_jobs WHERE rescheduled_from_job = ANY(%s)", [dead]
        )
        assert retried.fetchone() == {"n": 0}
    # The only errors the browser saw are failed loads: the first look before signing in
    # (401) and the two refusals (403).
    assert sorted(e.split("status of ")[-1] for e in errors) == ["401 ()", "403 ()", "403 ()"]
