"""``/readyz`` follows the database: 200 while Postgres answers, 503 naming the database
while it is stopped (``/healthz`` stays 200: the supervisor lives on), 200 again once it is
back, in a real supervisor process."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from chaos import FAULT_SETTINGS
from procs import running, start_supervisor
from waiting import wait_until

from qdworker.testing import PostgresServer
from qdworker.testing._ports import release_port, reserve_port


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # not listening yet
        return 0, str(exc)


def _until(port: int, path: str, status: int, timeout: float = 30.0) -> str:
    """The body of ``path`` once it answers ``status``."""
    seen = wait_until(lambda: (got := _get(port, path))[0] == status and got, timeout,
                      what=f"{path} to answer {status}")  # fmt: skip
    return seen[1]


def test_readyz_turns_503_while_postgres_is_stopped(
    pg: PostgresServer, pg_db: str, tmp_path: Path
) -> None:
    port = reserve_port("127.0.0.1")
    settings = {**FAULT_SETTINGS, "WORKER_COUNT": "1", "QDWORKER_HTTP_PORT": str(port)}
    with running(start_supervisor(pg_db, log=tmp_path / "supervisor.log", **settings)):
        _until(port, "/healthz", 200)
        assert json.loads(_until(port, "/readyz", 200)) == {"ready": True}
        pg.stop("fast")
        try:
            body = json.loads(_until(port, "/readyz", 503))
            assert body["ready"] is False
            assert any(reason.startswith("database:") for reason in body["reasons"]), body
            assert _get(port, "/healthz")[0] == 200
        finally:
            pg.start()
        assert json.loads(_until(port, "/readyz", 200)) == {"ready": True}
    release_port(port)
