"""Tests for qdworker.testing.TcpProxy, in front of a real Postgres (over TCP)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from waiting import wait_until

from qdworker import _devdb as devdb
from qdworker.testing._postgres import PostgresServer
from qdworker.testing._proxy import TcpProxy
from qdworker.testing._relay import MAX_PENDING_BYTES


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    wait_until(cond, timeout, what=what)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer.create() as server:
        server.start()
        yield server


@pytest.fixture
def proxy(pg: PostgresServer) -> Iterator[TcpProxy]:
    with TcpProxy(pg.host, pg.port) as p:
        yield p
    assert p.connections() == 0  # close() dropped everything


def backends(pg: PostgresServer, app: str) -> list[str]:
    """States of the server's sessions named `app` (seen directly, not through the proxy)."""
    with psycopg.connect(pg.url()) as conn:
        rows = conn.execute(
            "SELECT state FROM pg_stat_activity WHERE application_name = %s", [app]
        ).fetchall()
    return [r[0] for r in rows]


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_url_replaces_host_and_port(proxy: TcpProxy, pg: PostgresServer) -> None:
    params = psycopg.conninfo.conninfo_to_dict(proxy.url(pg.url("somedb") + "?sslmode=disable"))
    assert params == {
        "host": "127.0.0.1",
        "port": str(proxy.port),
        "user": "postgres",
        "dbname": "somedb",
        "sslmode": "disable",
    }


def test_query_through_proxy_blackhole_then_restore(proxy: TcpProxy, pg: PostgresServer) -> None:
    url = proxy.url(pg.url())
    with psycopg.connect(url, autocommit=True, application_name="bh") as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (pg.port,)
        assert proxy.connections() == 1
        assert proxy.bytes_to_server > 0 and proxy.bytes_to_client > 0
        # A client in another process goes through the proxy too.
        out = subprocess.run(
            [devdb.bin_path("psql"), url, "-tAc", "SELECT 40 + 2"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        assert out.stdout.strip() == "42"
        # psql's goodbye passes through the proxy asynchronously.
        wait_for(lambda: proxy.connections() == 1, timeout=5, what="psql connection closed")

        proxy.blackhole()
        try:  # (a failure here must not leave `conn` stuck for the `with` exit)
            sent_before = proxy.bytes_to_server
            t, out_ = in_thread(lambda: conn.execute("SELECT 2").fetchone())
            t.join(1.0)
            assert t.is_alive(), f"query completed during blackhole: {out_}"
            assert proxy.bytes_to_server == sent_before  # nothing went through
            assert proxy.connections() == 1  # nothing was closed...
            assert backends(pg, "bh") == ["idle"]  # ...and the query never reached the server
        finally:
            proxy.restore()
        t.join(5.0)
        assert not t.is_alive()
        assert out_ == {"value": (2,)}
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_cut_breaks_connections_new_ones_work(proxy: TcpProxy, pg: PostgresServer) -> None:
    url = proxy.url(pg.url())
    with psycopg.connect(url, autocommit=True, application_name="cut") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert backends(pg, "cut") == ["idle"]
        proxy.cut()
        assert proxy.connections() == 0
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    wait_for(lambda: backends(pg, "cut") == [], timeout=5, what="server session gone")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.accepted_total == 2


def test_new_connection_during_blackhole_times_out(proxy: TcpProxy, pg: PostgresServer) -> None:
    url = proxy.url(pg.url())
    proxy.blackhole()
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        psycopg.connect(url, connect_timeout=1)  # psycopg, like libpq, waits at least 2 s
    assert time.monotonic() - t0 < 5
    assert proxy.connections() == 1  # accepted, held back
    assert proxy.bytes_to_server == 0
    proxy.restore()
    with psycopg.connect(url, connect_timeout=2) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_large_results_pass_with_bounded_buffers(proxy: TcpProxy, pg: PostgresServer) -> None:
    size = 20 * MAX_PENDING_BYTES
    with psycopg.connect(proxy.url(pg.url())) as conn:
        row = conn.execute("SELECT length(%s::text), repeat('x', %s)", ["y" * size, size])
        length, text = row.fetchone() or (None, None)
    assert length == size and text == "x" * size
    assert proxy.bytes_to_server > size and proxy.bytes_to_client > size


def test_unreachable_target_resets_the_client() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with TcpProxy("127.0.0.1", port) as proxy:
        url = proxy.url(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        wait_for(lambda: proxy.connections() == 0, timeout=5, what="connection dropped")


def test_close_is_idempotent_and_control_after_close_is_harmless(pg: PostgresServer) -> None:
    proxy = TcpProxy(pg.host, pg.port).start()
    conn = psycopg.connect(proxy.url(pg.url()))
    try:
        proxy.close()
        proxy.close()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        proxy.blackhole()
        proxy.cut()
        with pytest.raises(RuntimeError, match="already started"):
            proxy.start()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.url(pg.url()), connect_timeout=2)
    finally:
        conn.close()
