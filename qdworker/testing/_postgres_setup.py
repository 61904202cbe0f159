"""The folders, configuration and processes of a throwaway
:class:`~qdworker.testing.PostgresServer`.

Folders. :func:`allocate_folders` makes one folder per server,
``tempfile.mkdtemp(prefix="qdworker-pg-", dir=base_dir or "/tmp")`` (mode 0755)::

    qdworker-pg-XXXXXXXX/data/              PGDATA (0700)
    qdworker-pg-XXXXXXXX/data/postgres.log  the server log (pg_ctl -l)
    qdworker-pg-XXXXXXXX/sock/              unix_socket_directories (0700)
    qdworker-pg-XXXXXXXX/watchdog.log       stderr of the watchdog

If that socket path would be too long for ``sun_path``, the socket folder is a second
``mkdtemp`` under ``/tmp`` instead, owned the same way. As root the data and socket folders
belong to the system user that runs Postgres (:func:`qdworker._devdb.postgres_user`), and a
``base_dir`` that user cannot traverse is refused: nothing is chmod'ed (pytest's ``tmp_path``,
below the 0700 ``/tmp/pytest-of-root``, is such a folder: use the default).

Configuration, appended to ``postgresql.conf`` (:func:`append_conf`): ``port``,
``unix_socket_directories``, then for a new cluster :data:`PRIMARY_SETTINGS`
(``listen_addresses``, ``wal_level=replica``, ``max_wal_senders=10``, ``wal_keep_size=64MB``,
``hot_standby=on``, ``fsync=off``: throwaway servers, and crash recovery after ``-m
immediate`` or SIGKILL still works, because the OS keeps the written pages), then the caller's
settings. ``pg_hba.conf`` gets ``host replication all 127.0.0.1/32 trust``.

Processes. Every Postgres process of a cluster works in its data dir, also after its
postmaster died and they were reparented: :func:`pids_in` finds them by their working
directory; :func:`clear_stale_lock_files` waits for them to go after a crash before removing
the lock files they leave. Linux only (reads ``/proc``).

Errors: :class:`~qdworker.errors.EmbeddedDatabaseError` for invalid settings and unreachable
folders (nothing is left behind then); OSError from the file system; TimeoutError from
:func:`wait_no_processes`. Resources: the folders :func:`allocate_folders` makes belong to
the caller, which removes them (:attr:`Folders.owned`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .. import _devdb as devdb
from ..errors import EmbeddedDatabaseError

logger = logging.getLogger("qdworker.testing.postgres")

HOST: Final = "127.0.0.1"
"""The address every server listens on (and the host of its URL)."""
PRIMARY_SETTINGS: Final[Mapping[str, str]] = {
    "listen_addresses": HOST,
    "wal_level": "replica",
    "max_wal_senders": "10",
    "wal_keep_size": "64MB",
    "hot_standby": "on",
    "fsync": "off",
}
POLL_INTERVAL_SECONDS: Final = 0.02
KILL_TIMEOUT_SECONDS: Final = 10.0
"""How long :meth:`~qdworker.testing.PostgresServer.kill` waits for the postmaster and its
children to exit (and ``start()`` for leftovers of a killed server)."""
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_OWN_SETTINGS: Final = frozenset({"port", "listen_addresses", "unix_socket_directories"})


@dataclass(frozen=True)
class Folders:
    """A server's folders: `root` holds `data` (and usually `socket`); `owned` are the
    folders to remove when the server is closed."""

    root: Path
    data: Path
    socket: Path
    owned: list[Path]


def check_settings(settings: Mapping[str, str] | None) -> dict[str, str]:
    """`settings` as a dict; EmbeddedDatabaseError for an invalid name or one the server
    sets itself (``port``, ``listen_addresses``, ``unix_socket_directories``)."""
    extra = dict(settings or {})
    for name in extra:
        if not _SETTING_NAME.match(name):
            raise EmbeddedDatabaseError(f"invalid Postgres setting name {name!r}")
        if name.lower() in _OWN_SETTINGS:
            raise EmbeddedDatabaseError(f"{name} is set by PostgresServer itself")
    return extra


def _check_reachable(folder: Path) -> None:
    missing = devdb.traverse_changes(folder)
    if missing:
        lines = "\n".join(f"  {c.describe()}" for c in missing)
        raise EmbeddedDatabaseError(
            f"user {devdb.SYSTEM_USER!r} (which runs Postgres, because Postgres refuses to "
            f"run as root) cannot reach {folder}; it would need:\n{lines}\n"
            "qdworker.testing does not change permissions: use a base_dir that user can "
            "traverse (the default, /tmp, works)"
        )


def allocate_folders(base_dir: Path | None) -> Folders:
    """Make a new server's folders under `base_dir` (default ``/tmp``); as root, after making
    the binaries usable (:func:`qdworker._devdb.prepare_binaries`), owned by the Postgres
    user. Removes what it made if it fails."""
    devdb.prepare_binaries()
    pw = devdb.postgres_user()
    base = Path(base_dir) if base_dir is not None else Path("/tmp")
    root = Path(tempfile.mkdtemp(prefix="qdworker-pg-", dir=base)).resolve()
    owned = [root]
    try:
        os.chmod(root, 0o755)
        if pw is not None:
            _check_reachable(root)
        data = root / "data"
        data.mkdir(mode=0o700)
        sock = root / "sock"
        if len(str(sock)) > devdb.MAX_SOCKET_DIR_CHARS:
            sock = Path(tempfile.mkdtemp(prefix="qdworker-pg-sock-", dir="/tmp"))
            owned.append(sock)
        else:
            sock.mkdir(mode=0o700)
        if pw is not None:
            for d in (data, sock):
                os.chown(d, pw.pw_uid, pw.pw_gid)
    except BaseException:
        remove(owned)
        raise
    return Folders(root, data, sock, owned)


def remove(folders: list[Path]) -> None:
    for d in folders:
        shutil.rmtree(d, ignore_errors=True)


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def append_conf(
    data_dir: Path, *, port: int, socket_dir: Path, settings: Mapping[str, str]
) -> None:
    """Append `port` and `socket_dir`, then `settings`, to postgresql.conf (later lines win,
    so this also overrides what a base backup copied)."""
    lines = {"port": str(port), "unix_socket_directories": str(socket_dir), **settings}
    text = "".join(f"{k} = {_conf_value(v)}\n" for k, v in lines.items())
    with open(data_dir / "postgresql.conf", "a") as f:
        f.write(f"\n# qdworker.testing.PostgresServer\n{text}")


def allow_replication(data_dir: Path) -> None:
    """Let standbys connect for replication from 127.0.0.1 (trust)."""
    with open(data_dir / "pg_hba.conf", "a") as f:
        f.write("\n# qdworker.testing\nhost replication all 127.0.0.1/32 trust\n")


def base_backup(data_dir: Path, *, port: int, timeout_seconds: float, log: Path) -> None:
    """``pg_basebackup -R -X stream`` of the server on `port` into `data_dir`, as the Postgres
    user (the files must belong to the user that runs the standby); EmbeddedDatabaseError with
    the tail of `log` (the primary's) if it fails. The primary's log copied along is emptied:
    the standby starts its own."""
    devdb.run_as_postgres_user(
        [
            devdb.bin_path("pg_basebackup"), "-D", str(data_dir),
            "-R", "-X", "stream", "-c", "fast", "--no-sync", "-w",
            "-h", HOST, "-p", str(port), "-U", devdb.PG_USER,
        ],
        timeout_seconds=timeout_seconds,
        log=log,
    )  # fmt: skip
    with contextlib.suppress(FileNotFoundError):
        os.truncate(data_dir / "postgres.log", 0)


def cwd_is(pid: int, folder: Path) -> bool:
    """Process `pid` works in `folder`."""
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(folder)
    except OSError:  # gone, a zombie, or not ours to look at
        return False


def pids_in(folder: Path) -> list[int]:
    """Live processes (other than this one) whose working directory is `folder`."""
    me = os.getpid()
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and int(entry) != me and cwd_is(int(entry), folder)
    ]


def clear_stale_lock_files(data_dir: Path, socket_dir: Path, port: int, what: str) -> None:
    """After a crash: wait for the dead postmaster's children, then remove its lock files
    (``postmaster.pid`` and the socket's ``.lock``).  Postgres itself would refuse to start
    while the pid they name is a zombie nobody reaped yet, as happens under a PID 1 that reaps
    slowly (containers, VMs).  TimeoutError if the children do not go."""
    pidfile = data_dir / "postmaster.pid"
    if not pidfile.exists():
        return
    wait_no_processes(data_dir, KILL_TIMEOUT_SECONDS, what)
    logger.info("%s: removing stale %s (pid %s)", what, pidfile, devdb.postmaster_pid(data_dir))
    sock = socket_dir / f".s.PGSQL.{port}"
    for stale in (pidfile, sock.with_name(f"{sock.name}.lock"), sock):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def wait_no_processes(folder: Path, timeout_seconds: float, what: str) -> None:
    """Wait until no process works in `folder`; TimeoutError naming `what` after
    `timeout_seconds`."""
    deadline = time.monotonic() + timeout_seconds
    while left := pids_in(folder):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: Postgres processes {left} still running")
        time.sleep(POLL_INTERVAL_SECONDS)
