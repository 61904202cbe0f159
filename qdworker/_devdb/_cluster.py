"""Starting, attaching to and stopping the embedded Postgres server of a data dir.

Layout of ``data_dir`` (created if missing, owned by the caller)::

    data_dir/pgdata/          PGDATA (owned by ``embedded_postgres`` when run as root)
    data_dir/start.lock       flock(LOCK_EX) while a process initialises/starts/attaches
    data_dir/attach.lock      every attached handle holds flock(LOCK_SH) on its own fd
    data_dir/watchdog.log     stderr of the watchdog process
    data_dir/pgdata.location  root only: PGDATA lives elsewhere (see :mod:`._placement`)

The server listens only on a unix socket (see :mod:`._placement`), trust auth, user
``postgres``. :func:`start` is idempotent: if a server already runs on the data dir (started
by this or another process) it attaches (``started_here=False``); an initialised data dir is
reused.

Orphan protection: the process that starts the postmaster first starts a watchdog
(:mod:`._watchdog`) that waits for the end of its starter -- :func:`stop`, exit, crash or
SIGKILL -- then takes ``flock(LOCK_EX)`` on ``attach.lock``, which blocks until no other
process is attached, and runs ``pg_ctl stop -m fast``. Forked (not exec'ed) children inherit
both fds and therefore count as attached until they exit. Measured on the dev box (Linux,
PG 18.6, tests/db/test_embedded.py):

* SIGKILL of the owner: postmaster cleanly shut down (postmaster.pid removed)
  ~0.02 s after the owner was reaped.
* SIGTERM of the owner with Python's default disposition (no atexit, no finally):
  identical, ~0.02 s.  A supervisor that handles SIGTERM should call :func:`stop`.
* Owner exits normally without calling :func:`stop`: same path, server stopped.
* Owner dies (or stops) while another process is attached: the server keeps
  running and is stopped ~0.02 s after the last attached process detaches or dies.

Timings: first start (initdb + start) ~0.5 s, restart of an initialised dir ~0.12 s
(``pg_ctl -w`` polls every 0.1 s), attach ~0.01 s, stop ~0.11 s.

Errors: :class:`~qdworker.errors.EmbeddedDatabaseError` when the server cannot be initialised,
started or stopped (with the command's output) or, as root, when a home directory would have
to be loosened; OSError from the file system. Resources: per handle (one per successful
:func:`start`, released by :func:`stop`) the shared lock on ``attach.lock``; for the starter
also the watchdog and its pipe. Thread-safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import shlex
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..errors import EmbeddedDatabaseError
from ._binaries import PG_USER, bin_path, initdb, pg_ctl
from ._permissions import SYSTEM_USER, RootUser, apply_changes, postgres_user, want_traverse
from ._placement import POINTER_NAME, pgdata_of, prepare_as_root, socket_dir, write_pointer
from ._watchdog import Watchdog, lock_file, pid_alive

logger = logging.getLogger("qdworker.devdb")

START_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 60
"""``pg_ctl stop -t`` of :func:`stop` and of the watchdog."""
WATCHDOG_EXIT_TIMEOUT_SECONDS: Final = 10.0
_START_LOCK_NAME: Final = "start.lock"
_ATTACH_LOCK_NAME: Final = "attach.lock"
_WATCHDOG_LOG_NAME: Final = "watchdog.log"


@dataclass(frozen=True)
class EmbeddedServer:
    """A handle on the server of `data_dir` (from :func:`start`; release it with :func:`stop`)."""

    data_dir: Path
    url: str
    pid: int
    started_here: bool
    _handle: int = field(default=0, repr=False, compare=False)


@dataclass
class _Handle:
    data_dir: Path
    pgdata: Path
    attach_fd: int
    watchdog: Watchdog | None = None


_handles: dict[int, _Handle] = {}
_handles_lock = threading.Lock()
_handle_ids = itertools.count(1)


def running(pgdata: Path) -> tuple[int, str] | None:
    """(pid, url) of a ready postmaster on `pgdata`, else None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    if len(lines) < 8 or lines[7].strip() != "ready":
        return None
    try:
        pid, port = int(lines[0]), int(lines[3])
    except ValueError:
        return None
    socket_folder = lines[4].strip().split(",")[0].strip()
    if not socket_folder or not pid_alive(pid):
        return None
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
            return None  # pid reused by something else
    if not Path(socket_folder, f".s.PGSQL.{port}").exists():
        return None
    host = urllib.parse.quote(socket_folder, safe="/")
    return pid, f"postgresql://{PG_USER}@/postgres?host={host}&port={port}"


def url_for(data_dir: Path) -> str | None:
    """libpq URL of the server running on `data_dir`, or None if none is running."""
    info = running(pgdata_of(Path(data_dir).resolve()))
    return info[1] if info else None


def start(data_dir: Path, *, allow_permission_changes: bool = False) -> EmbeddedServer:
    """Start (or attach to) the embedded Postgres server on `data_dir`.

    Idempotent: if a server already runs on `data_dir` (started by this or another
    process), attach to it (``started_here=False``).  An initialised data dir is reused.
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir).resolve()
    pgdata, why = _prepare(data_dir, allow_permission_changes)
    handle, (pid, url), started_here = _start_or_attach(data_dir, pgdata, why)
    with _handles_lock:
        hid = next(_handle_ids)
        _handles[hid] = handle
    logger.info(
        "%s embedded Postgres on %s%s (pid %d) in %.3f s",
        "started" if started_here else "attached to",
        data_dir,
        f" (cluster {pgdata})" if why else "",
        pid,
        time.perf_counter() - t0,
    )
    return EmbeddedServer(data_dir, url, pid, started_here, hid)


def _prepare(data_dir: Path, allow: bool) -> tuple[Path, str | None]:
    """Create `data_dir`; as root choose PGDATA and make the permission changes it takes
    (refusing, before creating anything, those in home directories unless `allow`).
    Returns (PGDATA, why it is outside `data_dir`, or None)."""
    pw = postgres_user()
    if pw is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        return pgdata_of(data_dir), None
    pgdata, why = prepare_as_root(data_dir, pw, allow)
    created = {p for p in [data_dir, *data_dir.parents] if not p.exists()}
    data_dir.mkdir(parents=True, exist_ok=True)
    if why is not None:
        write_pointer(data_dir, pgdata)
    elif created:
        wants: dict[Path, int] = {}
        want_traverse(wants, data_dir)
        apply_changes(
            RootUser.of(pw).plan(wants),
            str(data_dir),
            allow=allow,
            created=created,
            not_avoided=[],
        )
    return pgdata, why


def _start_or_attach(
    data_dir: Path, pgdata: Path, why: str | None
) -> tuple[_Handle, tuple[int, str], bool]:
    """Under ``start.lock``: attach to the running server, or start it. Returns the handle,
    (pid, url) and whether it was started here."""
    start_fd = lock_file(data_dir / _START_LOCK_NAME, fcntl.LOCK_EX)
    attach_fd = -1
    try:
        # Blocks while a watchdog is stopping the server (it holds LOCK_EX).
        attach_fd = lock_file(data_dir / _ATTACH_LOCK_NAME, fcntl.LOCK_SH)
        handle = _Handle(data_dir, pgdata, attach_fd)
        info = running(pgdata)
        if info is not None:
            return handle, info, False
        if why is not None:
            logger.warning(
                "running as root: the Postgres cluster of %s is in %s (not in the data "
                "dir), because %s; %s points there",
                data_dir,
                pgdata,
                why,
                POINTER_NAME,
            )
        return handle, _start_server(handle), True
    except BaseException:
        if attach_fd >= 0:
            os.close(attach_fd)
        raise
    finally:
        os.close(start_fd)


def _start_server(handle: _Handle) -> tuple[int, str]:
    pgdata = handle.pgdata
    pw = postgres_user()
    if not pgdata.exists():
        pgdata.mkdir(mode=0o700)
    if pw is not None and pgdata.stat().st_uid != pw.pw_uid:
        logger.info("running as root: chown %s to %s", pgdata, SYSTEM_USER)
        os.chown(pgdata, pw.pw_uid, pw.pw_gid)
    if not (pgdata / "PG_VERSION").exists():
        logger.info("initialising embedded Postgres data dir %s", pgdata)
        initdb(pgdata, sync=True)
    # Watchdog first, so a crash during pg_ctl start cannot orphan the postmaster.
    handle.watchdog = Watchdog.spawn(
        pg_ctl=bin_path("pg_ctl"),
        pgdata=pgdata,
        user=pw.pw_name if pw else "",
        log_file=handle.data_dir / _WATCHDOG_LOG_NAME,
        mode="fast",
        stop_timeout_seconds=STOP_TIMEOUT_SECONDS,
        wait_lock=handle.data_dir / _ATTACH_LOCK_NAME,
    )
    try:
        sock = socket_dir(pgdata, pw)
        log = str(pgdata / "postgres.log")
        opts = f"-h '' -k {shlex.quote(str(sock))}"
        pg_ctl("start", pgdata, "-l", log, "-o", opts, timeout_seconds=START_TIMEOUT_SECONDS)
    except BaseException:
        _close_watchdog(handle, wait=True)
        raise
    info = running(pgdata)
    if info is None:
        _close_watchdog(handle, wait=True)
        raise EmbeddedDatabaseError(f"Postgres on {pgdata} did not become ready")
    return info


def _close_watchdog(handle: _Handle, *, wait: bool) -> None:
    wd, handle.watchdog = handle.watchdog, None
    if wd is not None:
        wd.close(WATCHDOG_EXIT_TIMEOUT_SECONDS if wait else 0)


def stop(server: EmbeddedServer) -> None:
    """Detach from the server; stop it (fast shutdown) if we started it and nobody else
    is attached.  If other processes are attached, the server is stopped by the
    watchdog once the last one detaches.  Safe to call twice."""
    with _handles_lock:
        handle = _handles.pop(server._handle, None)
    if handle is None:
        return
    os.close(handle.attach_fd)
    if handle.watchdog is None:  # attached only
        logger.info("detached from embedded Postgres on %s", server.data_dir)
        return
    try:
        ex_fd = lock_file(handle.data_dir / _ATTACH_LOCK_NAME, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.info(
            "embedded Postgres on %s still in use by other processes; it will be stopped "
            "when the last one detaches",
            server.data_dir,
        )
        _close_watchdog(handle, wait=False)
        return
    try:
        if running(handle.pgdata) is not None:
            t0 = time.perf_counter()
            pg_ctl("stop", handle.pgdata, "-m", "fast", timeout_seconds=STOP_TIMEOUT_SECONDS)
            logger.info(
                "stopped embedded Postgres on %s in %.3f s",
                server.data_dir,
                time.perf_counter() - t0,
            )
    finally:
        os.close(ex_fd)
        _close_watchdog(handle, wait=True)
