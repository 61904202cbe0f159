"""Former home of the embedded Postgres server, now :mod:`qdworker.devdb`: kept only until the
imports of ``qdworker.db.embedded`` (cli, client, supervisor, benchmark) are moved there, then
deleted. Re-exports what those use; holds no code, state or resources of its own, and raises
nothing beyond what importing :mod:`qdworker.devdb` raises.
"""

from __future__ import annotations

from ..devdb import EmbeddedServer as EmbeddedServer
from ..devdb import PermissionChange as PermissionChange
from ..devdb import bin_path
from ..devdb import plan_permission_changes as plan_permission_changes
from ..devdb import start as start
from ..devdb import stop as stop
from ..devdb import url_for as url_for
from ..errors import EmbeddedDatabaseError as EmbeddedDatabaseError

_bin = bin_path  # qdworker/cli.py: embedded._bin("psql")
