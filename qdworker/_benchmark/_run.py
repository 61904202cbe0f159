"""What every workload is handed: :class:`Run`, holding the scratch database, the folder of
the supervisors' logs, the default settings reported with each figure and the progress line;
and the warmed-up supervisor session (:meth:`Run.warm_session`) in which ``wakeup``,
``steady``, ``cost`` and ``drain_clients`` measure an idle worker.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._config import Config
from ._scratch import ScratchDatabase, warm_up
from .procs import Supervisor


@dataclass
class Session:
    """A supervisor started on a fresh scratch database and warmed up."""

    url: str
    supervisor: Supervisor
    status: int | None = None  # its exit status, once stopped


class Run:
    """One ``bench`` invocation's shared state, from :meth:`opened` on."""

    def __init__(
        self,
        database_url: str | None,
        keep_logs: Path | None,
        timeout_s: float,
        progress: Callable[[str], None] | None,
    ) -> None:
        self.db = ScratchDatabase(database_url)
        self.timeout_s = timeout_s  # per wait for a queue to drain
        self.defaults = Config()
        self._keep_logs = keep_logs
        self._logs: Path | None = None
        self._progress = progress

    @contextmanager
    def opened(self) -> Iterator[None]:
        """The server started and the logs folder made; both cleaned up after."""
        self.db.start()
        tmp_logs: str | None = None
        try:
            if self._keep_logs is not None:
                self._keep_logs.mkdir(parents=True, exist_ok=True)
                self._logs = self._keep_logs
            else:
                tmp_logs = tempfile.mkdtemp(prefix="qdworker-bench-logs-")
                self._logs = Path(tmp_logs)
            yield
        finally:
            self.db.close()
            if tmp_logs is not None:
                shutil.rmtree(tmp_logs, ignore_errors=True)

    def say(self, text: str) -> None:
        if self._progress is not None:
            self._progress(text)

    def settings(self, **changes: Any) -> dict[str, Any]:
        """The settings a figure was measured with: the defaults with ``changes``."""
        cfg = self.defaults.replace(**changes)
        return {
            "worker_count": cfg.worker_count,
            "concurrency": cfg.concurrency,
            "poll_interval_s": cfg.poll_interval,
            "lease_seconds": cfg.lease_seconds,
            "ws_enabled": cfg.ws_enabled,
            "log_level": cfg.log_level,
            "database": self.db.description,
            "postgres": self.db.version,
        }

    def supervisor(self, name: str, **settings: str) -> Supervisor:
        """A supervisor on the scratch database, logging to ``NAME.log`` (not started)."""
        assert self._logs is not None
        return Supervisor(self.db.url, self._logs / f"{name}.log", **settings)

    @asynccontextmanager
    async def warm_session(self, name: str) -> AsyncIterator[Session]:
        """A fresh scratch database, a supervisor at default settings started on it and
        warmed up (:func:`~._scratch.warm_up`); stopped on exit, its status in the session."""
        url = await self.db.afresh()
        session = Session(url, self.supervisor(name))
        proc = session.supervisor.start()
        try:
            await warm_up(url, proc)
            yield session
        finally:
            session.status = session.supervisor.stop()


def exit_notes(status: int | None) -> list[str]:
    """A note if a supervisor did not exit cleanly."""
    return [f"supervisor exit status {status}"] if status not in (0, None) else []
