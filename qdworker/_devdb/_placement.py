"""Where the cluster of a data dir lives -- its PGDATA and its socket folder -- and, as root,
moving it out of home directories.

PGDATA is ``data_dir/pgdata``. As root, when a home directory (or a folder inside one) keeps
the system user ``embedded_postgres`` from reaching it, PGDATA goes to
``/var/lib/qdworker/clusters/<sha256(data_dir)[:16]>/pgdata`` instead (0700,
``embedded_postgres``; ``data_dir.path`` next to it names the data dir it belongs to), and
``data_dir/pgdata.location`` records the relocation, so later starts, attaches and
:func:`~qdworker._devdb.url_for` use the same cluster. Logged at WARNING, with the reason, by
the process that starts the server. Deleting ``data_dir`` does not delete the cluster. A
cluster that already exists in ``data_dir/pgdata`` is never moved. Missing ``x`` bits outside
home directories are added; if a home directory would still have to change (e.g.
``/var/lib/qdworker`` cannot be created), :func:`prepare_as_root` raises, unless permission
changes are allowed (see :mod:`._permissions`).

The server listens only on a unix socket: in PGDATA itself, or in
``$TMPDIR/qdworker-<uid>-<hash>`` (``/tmp/...`` if the Postgres user cannot reach ``$TMPDIR``)
if PGDATA's path is too long for a socket address (:data:`MAX_SOCKET_DIR_CHARS`).

Errors: :class:`~qdworker.errors.EmbeddedDatabaseError` (a cluster folder that belongs to
another data dir, a socket folder that is not ours, refused permission changes); OSError from
the file system. Resources: the files named above, which outlive the process on purpose.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import stat
import tempfile
from pathlib import Path
from typing import Final

from ..errors import EmbeddedDatabaseError
from . import _permissions
from ._binaries import select_bin_dir
from ._permissions import RootUser, apply_changes, root_dir, want_install, want_traverse

logger = logging.getLogger("qdworker.devdb")

PGDATA_NAME: Final = "pgdata"
POINTER_NAME: Final = "pgdata.location"
MAX_SOCKET_DIR_CHARS: Final = 88
"""Longest socket folder path: ``+ "/.s.PGSQL.NNNNN"`` must fit ``sun_path`` (104 bytes on
macOS, 108 on Linux)."""
_CLUSTERS_NAME: Final = "clusters"
_CLUSTER_OWNER_NAME: Final = "data_dir.path"


def cluster_dir(data_dir: Path) -> Path:
    """Root: the folder under the state folder that would hold `data_dir`'s relocated PGDATA."""
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return _permissions.STATE_DIR / _CLUSTERS_NAME / digest


def pgdata_of(data_dir: Path) -> Path:
    """PGDATA of `data_dir`: ``data_dir/pgdata``, or as root the cluster under the state
    folder if ``data_dir/pgdata.location`` exists."""
    if os.geteuid() == 0 and (data_dir / POINTER_NAME).is_file():
        return cluster_dir(data_dir) / PGDATA_NAME
    return data_dir / PGDATA_NAME


def _prepare_cluster_dir(data_dir: Path) -> Path:
    """Root: PGDATA for `data_dir` under the state folder (its parent folders created)."""
    state = _permissions.STATE_DIR
    root_dir(state)
    root_dir(state / _CLUSTERS_NAME)
    cdir = cluster_dir(data_dir)
    root_dir(cdir)
    owner = cdir / _CLUSTER_OWNER_NAME
    try:
        recorded = owner.read_text().rstrip("\n")
    except FileNotFoundError:
        owner.write_text(f"{data_dir}\n")
        os.chmod(owner, 0o644)
        recorded = str(data_dir)
    if recorded != str(data_dir):
        raise EmbeddedDatabaseError(f"{cdir} belongs to data dir {recorded}, not {data_dir}")
    return cdir / PGDATA_NAME


def write_pointer(data_dir: Path, pgdata: Path) -> None:
    """Record in ``data_dir/pgdata.location`` that `data_dir`'s cluster is `pgdata`."""
    pointer = data_dir / POINTER_NAME
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
    tmp = pointer.with_name(f".{POINTER_NAME}.{os.getpid()}")
    tmp.write_text(want)
    os.replace(tmp, pointer)


def prepare_as_root(data_dir: Path, pw: pwd.struct_passwd, allow: bool) -> tuple[Path, str | None]:
    """Choose the binaries and PGDATA, fix what may be fixed, refuse what may not.

    Returns (pgdata, why it is outside `data_dir`, or None).  Creates nothing in
    `data_dir` or its missing parents."""
    root_user = RootUser.of(pw)
    bin_dir, bin_error = select_bin_dir(root_user)
    existing = data_dir
    while not existing.exists():
        existing = existing.parent
    data_wants: dict[Path, int] = {}
    want_traverse(data_wants, existing)
    blocked = root_user.blocked_by_home(data_wants)
    pgdata = pgdata_of(data_dir)
    why: str | None = None
    data_error = None
    if pgdata != data_dir / PGDATA_NAME:  # relocated by an earlier start
        pgdata = _prepare_cluster_dir(data_dir)
        why = root_user.why(blocked) if blocked else f"{data_dir / POINTER_NAME} says so"
    elif blocked and (pgdata / "PG_VERSION").exists():
        data_error = f"{pgdata} already holds a Postgres cluster, which qdworker does not move"
    elif blocked:
        try:
            pgdata = _prepare_cluster_dir(data_dir)
            why = root_user.why(blocked)
        except (OSError, EmbeddedDatabaseError) as e:
            data_error = f"moving the Postgres cluster to {_permissions.STATE_DIR} failed: {e}"
    wants: dict[Path, int] = {}
    want_install(wants, bin_dir.parent)
    want_traverse(wants, pgdata.parent if why else existing)
    apply_changes(
        root_user.plan(wants),
        f"{pgdata.parent if why else data_dir} and the Postgres binaries in {bin_dir.parent}",
        allow=allow,
        created=set(),
        not_avoided=[e for e in (bin_error, data_error) if e],
    )
    return pgdata, why


def socket_dir(pgdata: Path, pw: pwd.struct_passwd | None) -> Path:
    """The folder of the server's unix socket (see the module docstring), created if needed
    and owned by `pw` (the Postgres user as root, else None)."""
    if len(str(pgdata)) <= MAX_SOCKET_DIR_CHARS:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    base = Path(tempfile.gettempdir()).resolve()
    if pw is not None:
        wants: dict[Path, int] = {}
        want_traverse(wants, base)
        if RootUser.of(pw).plan(wants):
            base = Path("/tmp")  # e.g. TMPDIR inside a home directory
    d = base / f"qdworker-{os.getuid()}-{digest}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.lstat()
    owner = pw.pw_uid if pw else os.getuid()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (owner, os.getuid()):
        raise EmbeddedDatabaseError(f"socket folder {d} exists and is not ours")
    if pw is not None and st.st_uid != pw.pw_uid:
        os.chown(d, pw.pw_uid, pw.pw_gid)
    if len(str(d)) > MAX_SOCKET_DIR_CHARS:
        raise EmbeddedDatabaseError(f"no socket folder short enough for {pgdata}")
    return d
