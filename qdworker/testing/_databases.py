"""Throwaway databases for tests: one migrated template per session, a clone per test.

:class:`TestDatabases` creates ``qdworker_template_<pid>`` on a server (migrated once), and
:meth:`TestDatabases.clone` gives each test its own copy (``CREATE DATABASE … TEMPLATE``,
about 10 ms), dropped afterwards (``WITH (FORCE)``: connections left open by the test are
ended). Names carry the creating process's id, so concurrent test sessions on one server never
clash. :func:`test_server` is the server: ``QDWORKER_TEST_DATABASE_URL``, or the embedded
Postgres, started for the session.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

#: Use this server instead of starting the embedded Postgres.
TEST_DATABASE_URL_ENV = "QDWORKER_TEST_DATABASE_URL"
#: The embedded test server's data dir (kept between sessions: a restart takes ~0.1 s).
DEFAULT_DATA_DIR = Path(os.environ.get("QDWORKER_TEST_DATA_DIR", "/tmp/qdworker-test-pg"))


def with_dbname(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname``."""
    return make_conninfo(url, dbname=dbname)


@contextmanager
def test_server(data_dir: Path = DEFAULT_DATA_DIR) -> Iterator[str]:
    """The URL of a server's maintenance database for a test session: the one named by
    ``QDWORKER_TEST_DATABASE_URL``, else the embedded Postgres in ``data_dir`` (a fresh
    temporary one if that cannot be used), stopped at the end."""
    url = os.environ.get(TEST_DATABASE_URL_ENV)
    if url:
        yield url
        return
    from .. import _devdb as devdb
    from ..errors import EmbeddedDatabaseError

    try:
        server = devdb.start(data_dir)
    except EmbeddedDatabaseError:
        # A data dir left broken by an earlier run must not fail the suite: start afresh.
        server = devdb.start(Path(tempfile.mkdtemp(prefix="qdworker-test-pg-")))
    try:
        yield server.url
    finally:
        devdb.stop(server)


class TestDatabases:
    """Template and clones on the server at ``server_url`` (see the module docstring)."""

    __test__ = False  # not a pytest test class

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.template = f"qdworker_template_{os.getpid()}"

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.server_url, autocommit=True)

    def create_template(self) -> str:
        """(Re)create and migrate the template; returns its URL."""
        import trio

        from .._db import connection, migrate

        with self._admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {self.template} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {self.template}")
        url = with_dbname(self.server_url, self.template)

        async def setup() -> None:
            conn = await connection.connect(url, "test", statement_timeout=False)
            try:
                await migrate.apply(conn)
            finally:
                await conn.aclose()

        trio.run(setup)
        return url

    def drop_template(self) -> None:
        with self._admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {self.template} WITH (FORCE)")

    @contextmanager
    def clone(self, prefix: str = "qdworker_test", *, empty: bool = False) -> Iterator[str]:
        """A new database (a copy of the template, or ``empty``), dropped afterwards."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        create = f"CREATE DATABASE {name}"
        if not empty:
            create += f" TEMPLATE {self.template} STRATEGY FILE_COPY"
        with self._admin() as admin:
            admin.execute(create)
        try:
            yield with_dbname(self.server_url, name)
        finally:
            with self._admin() as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
