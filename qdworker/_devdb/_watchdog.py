"""The orphan watchdog of a Postgres cluster (both ends), and the process primitives it shares
with the rest of :mod:`qdworker._devdb`.

Standard library only, on purpose: the watchdog process runs this very file by path, as
``python -I -S .../_watchdog.py ARGS`` (isolated mode, no site-packages, so it depends on
neither the environment nor the virtualenv of its owner, which may be a system python that
was lent a venv), and therefore cannot import the package. The package imports the same file
as ``qdworker._devdb._watchdog`` for :class:`Watchdog` and for the primitives the watchdog needs
too (:func:`run_as`, :func:`pid_alive`, :func:`lock_file`, :func:`postmaster_pid`), so that
each of those exists once.

How it protects against orphans: :meth:`Watchdog.spawn` starts the process in its own session
(Ctrl-C of the terminal does not reach it) and hands it the read end of a pipe whose write end
only the owner holds (non-inheritable, so exec'ed children do not get it; a child made with a
bare ``fork()`` does, and keeps the cluster alive until it exits too). The watchdog blocks
reading that pipe. On EOF -- the owner called :meth:`Watchdog.close`, exited, crashed or was
SIGKILLed: the kernel closes the write end in every case -- it

1. with ``--wait-lock PATH``: takes ``flock(LOCK_EX)`` on PATH, which blocks while any other
   process holds a shared lock on it (the embedded server: every attached process does; the
   kernel drops the locks of dead processes, so there is no stale count);
2. if ``PGDATA/postmaster.pid`` exists: runs ``pg_ctl stop -m MODE -w -t N`` as ``--user``;
3. with ``--remove FOLDER...``: removes those folders, unless a postmaster is still alive.

Errors: the watchdog never raises into its owner; it writes what went wrong (the output of a
failed ``pg_ctl``, a traceback) to its stderr, which :meth:`Watchdog.spawn` points at a log
file. :meth:`Watchdog.spawn` raises OSError if the process cannot be started;
:meth:`Watchdog.close` never raises: a watchdog that does not exit within the wait is logged at
WARNING and reaped later. :func:`run_as` raises :class:`subprocess.TimeoutExpired` when the
command outlives its timeout (the process is killed then) and OSError if it cannot be started.

Resources: owner side, the pipe's write end and the ``Popen`` object until
:meth:`Watchdog.close`; watchdogs not waited for are kept in a module list and reaped (polled)
on later closes, so none is left a zombie.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import pwd
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Final

logger = logging.getLogger("qdworker.devdb")

SCRIPT: Final = Path(__file__).resolve()
PG_CTL_GRACE_SECONDS: Final = 10.0
"""Added to ``pg_ctl -t N`` for the timeout of the ``pg_ctl`` process itself."""

_unreaped: list[subprocess.Popen[bytes]] = []
_unreaped_lock = threading.Lock()


# --------------------------------------------------------------------------- shared primitives


def run_as(
    args: Sequence[str], user: str, *, timeout_seconds: float
) -> subprocess.CompletedProcess[str]:
    """Run `args` (stdin ``/dev/null``, output captured as text, cwd ``/``) as system user
    `user` (its uid and primary group, no supplementary groups), or as ourselves if `user` is
    empty. Does not check the exit code."""
    pw = pwd.getpwnam(user) if user else None
    return subprocess.run(
        list(args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd="/",
        timeout=timeout_seconds,
        check=False,
        user=pw.pw_uid if pw else None,
        group=pw.pw_gid if pw else None,
        extra_groups=[] if pw else None,
    )


def pid_alive(pid: int) -> bool:
    """`pid` names a live process (ours or not); a zombie nobody reaped yet counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to another user
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill() found it


def lock_file(path: Path, operation: int) -> int:
    """Open (create, 0644) `path` and ``flock`` it with `operation` (``LOCK_SH``/``LOCK_EX``,
    optionally ``| LOCK_NB``); returns the fd, which holds the lock until closed. The fd is
    closed again if locking fails (BlockingIOError for a refused ``LOCK_NB``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, operation)
    except BaseException:
        os.close(fd)
        raise
    return fd


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid ``PGDATA/postmaster.pid`` names, or None if there is no readable one."""
    try:
        with open(pgdata / "postmaster.pid") as f:
            return int(f.readline())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- owner side


class Watchdog:
    """Owner side of one watchdog process: the process and the write end of its pipe."""

    def __init__(self, process: subprocess.Popen[bytes], pipe_w: int, pgdata: Path) -> None:
        self._process = process
        self._pipe_w: int | None = pipe_w
        self._pgdata = pgdata

    @classmethod
    def spawn(
        cls,
        *,
        pg_ctl: str,
        pgdata: Path,
        user: str,
        log_file: Path,
        mode: str,
        stop_timeout_seconds: int,
        wait_lock: Path | None = None,
        remove: Sequence[Path] = (),
    ) -> Watchdog:
        """Start a watchdog for the cluster in `pgdata` (see the module docstring); its stderr
        is appended to `log_file`. Raises OSError if it cannot be started."""
        args = [
            "--pg-ctl", pg_ctl, "--pgdata", str(pgdata), "--user", user, "--mode", mode,
            "--stop-timeout-seconds", str(stop_timeout_seconds),
        ]  # fmt: skip
        if wait_lock is not None:
            args += ["--wait-lock", str(wait_lock)]
        if remove:
            args += ["--remove", *map(str, remove)]
        r, w = os.pipe()  # both ends non-inheritable; r is passed explicitly
        try:
            with open(log_file, "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(SCRIPT), "--pipe-fd", str(r), *args],
                    pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=log, cwd="/", start_new_session=True,
                )  # fmt: skip
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        return cls(process, w, pgdata)

    @property
    def pid(self) -> int:
        return self._process.pid

    def running(self) -> bool:
        """The watchdog process has not exited (it may be acting already)."""
        return self._process.poll() is None

    def close(self, wait_seconds: float) -> None:
        """Close the pipe, so the watchdog acts now, and wait up to `wait_seconds` (0: not at
        all) for it to exit. One that does not is logged at WARNING (if waited for) and reaped
        by a later close. Idempotent."""
        if self._pipe_w is not None:
            os.close(self._pipe_w)
            self._pipe_w = None
        with _unreaped_lock:
            _unreaped[:] = [p for p in _unreaped if p.poll() is None]
        if wait_seconds > 0:
            try:
                self._process.wait(timeout=wait_seconds)
            except subprocess.TimeoutExpired:
                logger.warning("watchdog (pid %d) of %s did not exit", self.pid, self._pgdata)
            else:
                return
        with _unreaped_lock:
            _unreaped.append(self._process)


# --------------------------------------------------------------------------- watchdog side


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qdworker-watchdog", description="stop a Postgres cluster when its owner is gone"
    )
    p.add_argument("--pipe-fd", type=int, required=True)
    p.add_argument("--pg-ctl", required=True)
    p.add_argument("--pgdata", type=Path, required=True)
    p.add_argument("--user", default="")
    p.add_argument("--mode", choices=("smart", "fast", "immediate"), required=True)
    p.add_argument("--stop-timeout-seconds", type=int, required=True)
    p.add_argument("--wait-lock", type=Path)
    p.add_argument("--remove", type=Path, nargs="*", default=[])
    return p


def _wait_for_eof(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except InterruptedError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """The watchdog process (see the module docstring). Returns its exit status."""
    args = _parser().parse_args(argv)
    _wait_for_eof(args.pipe_fd)
    if args.wait_lock is not None:
        lock_file(args.wait_lock, fcntl.LOCK_EX)  # blocks while anyone is attached; kept
    status = 0
    if (args.pgdata / "postmaster.pid").exists():
        timeout = args.stop_timeout_seconds
        stop = [
            args.pg_ctl, "stop", "-D", str(args.pgdata), "-m", args.mode, "-w", "-t", str(timeout),
        ]  # fmt: skip
        res = run_as(stop, args.user, timeout_seconds=timeout + PG_CTL_GRACE_SECONDS)
        if res.returncode != 0:
            sys.stderr.write(f"pg_ctl stop exited with {res.returncode}:\n{res.stdout}{res.stderr}")
            status = 1
    pid = postmaster_pid(args.pgdata)
    if args.remove and (pid is None or not pid_alive(pid)):
        for folder in args.remove:
            shutil.rmtree(folder, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
