"""The transaction one block range is processed in, as filters see it (asyncio coroutines).

watchChain opens a dedicated connection per range, locks the chain's progress row, runs the
filters and stores the new last block, then commits: progress and every write a filter made
through :meth:`ChainTransaction.execute` become visible together or not at all. A crash, a
failed RPC call or a filter error rolls everything back (closing the connection without
commit), so the range is processed again, and each log is seen exactly once by writes made
through the transaction.

Messages queued with :meth:`ChainTransaction.notify_user` are sent only after the commit (a
rolled-back range never notifies); a crash between commit and sending loses them (at most
once), as QuickDapp's in-process notifications would be lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from .. import _protocol as protocol
from .._db import statements
from .._db.connect import DbOptions
from .._db.connection import Connection, connect
from .._logs import module_logger
from ._aio import trio_as_aio

logger = module_logger(__name__)


def _aio(fn: Any) -> Any:
    return trio_as_aio(fn)


async def open_range_connection(url: str) -> Connection:
    """A new non-autocommit connection (asyncio coroutine). The caller closes it."""
    conn: Connection = await _aio(connect)(
        url, "watchChain", DbOptions(), autocommit=False, statement_timeout=False
    )
    return conn


class ChainTransaction:
    """SQL on the range's transaction, savepoints, and notifications sent after commit.

    Does not own the connection. ``chain``, ``from_block`` and ``to_block`` describe the range.
    After the range is committed or rolled back, :meth:`execute` raises ``RuntimeError``.
    """

    def __init__(self, conn: Connection, chain: str, from_block: int, to_block: int) -> None:
        self.chain = chain
        self.from_block = from_block
        self.to_block = to_block
        self._conn = conn
        self._open = True
        self._savepoints = 0
        self._notifications: list[tuple[int, Mapping[str, Any]]] = []

    async def execute(
        self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run one statement in the range's transaction; return its rows (``[]`` if none)."""
        if not self._open:
            raise RuntimeError("the range's transaction is over; use ctx.db outside filters")
        rows: list[dict[str, Any]] = await _aio(self._conn.execute)(sql, params)
        return rows

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """Undo the block's writes (and queued notifications) if it raises; re-raises."""
        queued = len(self._notifications)
        await self.execute(statements.get("web3_savepoint"))
        self._savepoints += 1
        try:
            yield
        except Exception:
            await self.execute(statements.get("web3_savepoint_rollback"))
            await self.execute(statements.get("web3_savepoint_release"))
            del self._notifications[queued:]
            raise
        else:
            await self.execute(statements.get("web3_savepoint_release"))
        finally:
            self._savepoints -= 1

    def notify_user(self, user_id: int, message: Mapping[str, Any]) -> None:
        """Queue ``message`` for ``user_id``'s websocket clients, sent once the range commits.

        Raises ``TypeError``/``ValueError`` now if the message is not a JSON object of at most
        :data:`~qdworker._protocol.MAX_MESSAGE_BYTES`.
        """
        protocol.check_message(message)
        self._notifications.append((int(user_id), message))

    # --- used by watchChain ------------------------------------------------------------

    async def commit(self) -> list[tuple[int, Mapping[str, Any]]]:
        """Commit; return the queued notifications for the caller to send."""
        self._open = False
        await _aio(self._conn.run)(lambda raw: raw.commit())
        return self._notifications
