"""qdworker's test kit (public): throwaway Postgres servers, fresh databases, jobs run inline,
and faults injected for real.

* :class:`PostgresServer`: a cluster of its own (from the embedded Postgres binaries) to
  restart (``-m fast`` or ``-m immediate``), crash, stop for a while, replicate and promote;
* :class:`TcpProxy`: sits between clients and Postgres; :meth:`~TcpProxy.blackhole` stops
  forwarding without closing anything, :meth:`~TcpProxy.cut` resets every connection;
* :func:`terminate_backends`, :func:`pin_xmin`, :func:`drop_notifications`,
  :func:`kill_worker`: faults on a running system;
* :class:`TestDatabases`, :func:`test_server`: a migrated template per session and a clone per
  test; the pytest fixtures in :mod:`qdworker.testing.pytest_plugin` wrap them;
* :class:`InlineWorker`, :func:`run_jobs`: run due jobs in the test's own process.

Everything here talks to a real Postgres; nothing is mocked.
"""

from ._databases import TestDatabases, test_server, with_dbname
from ._faults import drop_notifications, kill_worker, pin_xmin, terminate_backends, worker_pids
from ._inline import InlineRun, InlineWorker, run_jobs
from ._postgres import PostgresServer
from ._proxy import TcpProxy

__all__ = [
    "InlineRun",
    "InlineWorker",
    "PostgresServer",
    "TcpProxy",
    "TestDatabases",
    "drop_notifications",
    "kill_worker",
    "pin_xmin",
    "run_jobs",
    "terminate_backends",
    "test_server",
    "with_dbname",
    "worker_pids",
]
