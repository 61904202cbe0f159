"""Does an open dashboard slow the workers down? Drains N no-op jobs with one supervisor
(default settings, one worker process), alternately with no browser and with headless chromium
showing the dashboard's jobs page live (it refetches the list on every live signal, the
heaviest page), and prints each round and the ratio of the means (docs/benchmarks.md,
"Drain with the dashboard open").

    python tools/dashboard_drain.py [--n 20000] [--rounds 3] [--page jobs]

Each round uses a fresh database on a Postgres server of its own (``qdworker.testing``); the
jobs are inserted in one statement once the supervisor is ready (and the page is open), and
the drain is timed by the database: ``min(started)`` -> ``max(finished)``. Needs playwright and
``/usr/bin/chromium`` (or ``QDWORKER_CHROMIUM``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from playwright.sync_api import sync_playwright

from qdworker.testing import PostgresServer, with_dbname
from qdworker.testing._ports import reserve_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("QDWORKER_CHROMIUM", "/usr/bin/chromium")
NOOP = "qdworker.bench.noop"


@contextmanager
def supervisor(url: str, port: int) -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QDWORKER_", "WORKER_"))}
    env.update(DATABASE_URL=url, QDWORKER_JOBS="qdworker._benchmark.jobs", QDWORKER_WS="false",
               QDWORKER_HTTP_PORT=str(port), LOG_LEVEL="warn", WORKER_LOG_LEVEL="warn",
               PYTHONPATH=str(ROOT))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "qdworker"], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the supervisor did not get ready") from None
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def drain(url: str, n: int) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO worker_jobs (type) SELECT %s FROM generate_series(1, %s)", (NOOP, n)
        )
        while conn.execute(
            "SELECT count(*) FROM worker_jobs WHERE type = %s AND finished IS NULL", (NOOP,)
        ).fetchone() != (0,):
            time.sleep(0.05)
        row = conn.execute(
            "SELECT extract(epoch FROM max(finished) - min(started)) FROM worker_jobs"
            " WHERE type = %s",
            (NOOP,),
        ).fetchone()
    assert row is not None
    return float(row[0])


def one_round(pg: PostgresServer, name: str, n: int, browser: Any | None, page_name: str) -> float:
    with psycopg.connect(pg.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = with_dbname(pg.url(), name)
    port = reserve_port("127.0.0.1")
    with supervisor(url, port):
        if browser is None:
            return n / drain(url, n)
        page = browser.new_page()
        try:
            page.goto(f"http://127.0.0.1:{port}/#/{page_name}")
            page.wait_for_selector("#status:has-text('Updated')")
            return n / drain(url, n)
        finally:
            page.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--page", default="jobs")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"without": [], "with": []}
    # trio-asyncio (imported by qdworker) would hand playwright a loop it cannot drive.
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    with PostgresServer.create() as pg, sync_playwright() as p:
        pg.start()
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for i in range(args.rounds):
            for mode in ("without", "with"):
                rate = one_round(pg, f"drain_{mode}_{i}", args.n,
                                 browser if mode == "with" else None, args.page)  # fmt: skip
                rates[mode].append(rate)
                print(f"round {i + 1}: {mode:7} dashboard: {rate:,.0f} jobs/s", flush=True)
        browser.close()
    without, with_ = statistics.mean(rates["without"]), statistics.mean(rates["with"])
    print(f"mean without {without:,.0f} jobs/s, with the {args.page} page open {with_:,.0f} "
          f"jobs/s: {with_ / without:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
