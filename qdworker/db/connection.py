"""Sync psycopg driven from async code (trio or asyncio), safely.

psycopg's async API is asyncio-only, so qdworker uses its sync API in worker threads. Every
statement goes through :func:`run_sync`, which runs a function in a thread with
``abandon_on_cancel``; if the caller is cancelled it asks the server to cancel the running
statement (``conn.cancel_safe()``) and rolls back an open transaction, so the connection is
usable again instead of staying blocked until the query ends.

:class:`Connection` owns one psycopg connection and serialises its use with a lock.
Errors are classified by SQLSTATE (:func:`is_transient`): connection loss, serialization
failures and deadlocks are transient and may be retried by callers that know the statement is
safe to repeat; everything else surfaces as :class:`~qdworker.errors.DatabaseError` with its
SQLSTATE.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread
import psycopg
from psycopg.rows import dict_row, tuple_row

from ..errors import DatabaseError

__all__ = [
    "CANCEL_GRACE_SECONDS",
    "CONNECT_TIMEOUT_SECONDS",
    "Connection",
    "connect",
    "is_transient",
    "redact",
    "run_sync",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a cancelled statement may take to abort before the connection is abandoned.
CANCEL_GRACE_SECONDS = 5.0
#: libpq connect timeout.
CONNECT_TIMEOUT_SECONDS = 10

#: SQLSTATE classes and codes that mean "try again": connection exceptions (08), serialization
#: failure, deadlock, admin shutdown / crash shutdown / cannot connect now.
_TRANSIENT_CLASSES = ("08",)
_TRANSIENT_CODES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03", "53300"})

_PASSWORD_RE = re.compile(r"(://[^:/@]*:)[^@]*@|(password\s*=\s*)\S+", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and errors)."""
    return _PASSWORD_RE.sub(
        lambda m: (m.group(1) or m.group(2)) + "***" + ("@" if m.group(1) else ""), url
    )


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` is a database error worth retrying (on a fresh connection if closed)."""
    if isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None:
        return True  # connection refused / lost before the server said anything
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, DatabaseError):
        sqlstate = exc.sqlstate
    if sqlstate is None:
        return False
    return sqlstate.startswith(_TRANSIENT_CLASSES) or sqlstate in _TRANSIENT_CODES


def _abort(conn: psycopg.Connection[Any]) -> None:
    """Cancel the statement running on ``conn`` and roll back; runs in a thread."""
    try:
        conn.cancel_safe(timeout=CANCEL_GRACE_SECONDS)
    except Exception:  # the connection may be gone already
        logger.debug("cancel_safe failed", exc_info=True)
    try:
        # Waits (on the connection's lock) for the cancelled statement to return.
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
    except Exception:
        logger.debug("rollback after cancel failed", exc_info=True)


async def run_sync(conn: psycopg.Connection[Any], fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` (which uses ``conn``) in a worker thread, cancel-safely.

    On cancellation the statement is cancelled on the server and any transaction rolled back
    (shielded, at most :data:`CANCEL_GRACE_SECONDS`), then the cancellation propagates.
    psycopg errors are converted to :class:`DatabaseError` carrying the SQLSTATE.
    """
    try:
        return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_GRACE_SECONDS):
            await anyio.to_thread.run_sync(_abort, conn, abandon_on_cancel=True)
        raise
    except psycopg.Error as exc:
        raise DatabaseError(str(exc).strip(), sqlstate=exc.sqlstate) from exc


def _open(url: str, autocommit: bool, application_name: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(
        url,
        autocommit=autocommit,
        row_factory=dict_row,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        application_name=application_name,
    )


async def connect(
    url: str, *, autocommit: bool = True, application_name: str = "qdworker"
) -> Connection:
    """Open a :class:`Connection`. Raises :class:`DatabaseError` (never showing the password)."""
    try:
        raw = await anyio.to_thread.run_sync(_open, url, autocommit, application_name)
    except psycopg.Error as exc:
        raise DatabaseError(
            f"cannot connect to {redact(url)}: {str(exc).strip()}", sqlstate=exc.sqlstate
        ) from exc
    return Connection(raw)


class Connection:
    """One psycopg connection used from async code; one statement at a time.

    Owns ``raw`` (close it with :meth:`aclose`). Methods are safe to cancel: see :func:`run_sync`.
    """

    def __init__(self, raw: psycopg.Connection[dict[str, Any]]) -> None:
        self.raw = raw
        self._lock = anyio.Lock()

    @property
    def closed(self) -> bool:
        return self.raw.closed

    async def run(self, fn: Callable[[psycopg.Connection[dict[str, Any]]], T]) -> T:
        """Run ``fn(raw_connection)`` in a thread under this connection's lock."""
        async with self._lock:
            return await run_sync(self.raw, fn, self.raw)

    async def execute(
        self, query: str, params: Mapping[str, Any] | Sequence[Any] | None = None
    ) -> list[dict[str, Any]]:
        """Execute one statement; return its rows as dicts (``[]`` when it returns none)."""

        def call(conn: psycopg.Connection[dict[str, Any]]) -> list[dict[str, Any]]:
            cur = conn.execute(cast(Any, query), params)
            return cur.fetchall() if cur.description is not None else []

        return await self.run(call)

    async def execute_tuples(
        self, query: str, params: Mapping[str, Any] | Sequence[Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Execute one statement; return its rows as tuples (cheaper: binary, no dicts)."""

        def call(conn: psycopg.Connection[dict[str, Any]]) -> list[tuple[Any, ...]]:
            with conn.cursor(row_factory=tuple_row, binary=True) as cur:
                cur.execute(cast(Any, query), params)
                return cur.fetchall() if cur.description is not None else []

        return await self.run(call)

    async def aclose(self) -> None:
        """Close the connection (idempotent, never raises)."""
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self.raw.close, abandon_on_cancel=True)
            except Exception:
                logger.debug("close failed", exc_info=True)
