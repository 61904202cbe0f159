"""Connections used from async code (trio or asyncio): :class:`Connection` and :class:`Link`.

psycopg's async API is asyncio-only, so qdworker drives its sync API from worker threads, one
statement at a time per connection. :class:`Connection` wraps one psycopg connection:

* before a statement, a non-blocking look at the socket finds a connection the server has
  closed meanwhile (a restart, ``pg_terminate_backend``, an idle timeout), so such a failure
  is reported as :class:`~qdworker.errors.DatabaseUnavailableError` (nothing was sent) rather
  than as an unknown outcome;
* a statement that gets no answer within the client deadline gives the connection up (its
  socket is shut down, which also frees the thread waiting on it) and raises
  :class:`~qdworker.errors.OutcomeUnknownError`: that is how a black-holed network is noticed;
* if the *caller* is cancelled, the statement is cancelled on the server and any transaction
  rolled back (shielded, at most :data:`CANCEL_GRACE_SECONDS`), so the connection stays usable;
* psycopg errors become :mod:`qdworker.errors` through :func:`~.connect.translate`.

:class:`Link` is a connection that reopens itself: the one reconnect loop every long-lived
service uses (claimer, completer, relay, supervisor, client). It reports to
:data:`~.connect.OUTAGE`, so an outage is logged once, not once per retry.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar, cast

import anyio
import anyio.to_thread
import psycopg
from psycopg.rows import tuple_row

from .._logs import module_logger
from ..errors import DatabaseError, DatabaseUnavailableError, OutcomeUnknownError
from .connect import OUTAGE, Backoff, DbOptions, connect_sync, is_configuration_problem, translate

logger = module_logger(__name__)

T = TypeVar("T")
Raw = psycopg.Connection[Any]

#: Reads (and milliseconds to wait for more) when an idle connection turned readable: a
#: closing server's FATAL message and its end of stream arrive together, or nearly.
_CLOSE_READS: Final = 4
_CLOSE_WAIT_MS: Final = 50
#: How long a cancelled statement may take to abort before the connection is given up.
CANCEL_GRACE_SECONDS: Final = 5.0
#: Pause between attempts while the database refuses us for a reason only a change of settings
#: fixes (wrong password, missing database): retrying goes on, but slowly.
CONFIGURATION_RETRY_SECONDS: Final = 10.0


def _server_closed(raw: Raw) -> bool:
    """True if ``raw`` is known broken, or the server closed it while it was idle. Call only
    while no statement runs. Costs one non-blocking poll when nothing arrived (the usual
    case); when something did, it is read: a server that ends a connection sends a FATAL
    message and then closes, so reading goes on (briefly) until the end of the stream."""
    if raw.closed:
        return True
    pgconn = raw.pgconn
    try:
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN)
        if not poller.poll(0):
            return False
        for _ in range(_CLOSE_READS):
            pgconn.consume_input()  # raises at the end of the stream
            if raw.closed or not poller.poll(_CLOSE_WAIT_MS):
                break
    except (psycopg.Error, OSError, ValueError):
        return True
    return raw.closed or b"FATAL" in (pgconn.error_message or b"")


def _cancel_statement(raw: Raw) -> None:
    """Cancel the statement running on ``raw`` and roll back; runs in a thread."""
    try:
        raw.cancel_safe(timeout=CANCEL_GRACE_SECONDS)
    except Exception:  # the connection may be gone already
        logger.debug("cancel_safe failed", exc_info=True)
    try:
        # Waits (on the connection's lock) for the cancelled statement to return.
        if not raw.closed and raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raw.rollback()
    except Exception:
        logger.debug("rollback after cancel failed", exc_info=True)


def _shutdown_socket(raw: Raw) -> None:
    """Wake any thread blocked on ``raw``'s socket and make every later use fail at once."""
    try:
        fd = raw.pgconn.socket
    except (psycopg.Error, ValueError):
        return
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close(raw: Raw) -> None:
    with raw.lock:  # after any thread still using it (its socket is shut down if abandoned)
        raw.close()


class Connection:
    """One psycopg connection used from async code; one statement at a time.

    Owns ``raw`` (close it with :meth:`aclose`). ``deadline`` bounds every statement (``None``:
    unbounded, for job handlers' own SQL).
    """

    def __init__(self, raw: Raw, *, deadline: float | None) -> None:
        self.raw = raw
        self._deadline = deadline
        self._lock = anyio.Lock()
        self._given_up = False

    @property
    def closed(self) -> bool:
        return self._given_up or self.raw.closed

    async def run(self, fn: Callable[[Raw], T]) -> T:
        """Run ``fn(raw)`` in a thread under this connection's lock (see the module docstring
        for what each failure raises)."""
        async with self._lock:
            if self._given_up or _server_closed(self.raw):
                self._given_up = True
                raise DatabaseUnavailableError(
                    "the database closed this connection while it was idle; nothing was sent"
                )
            return await self._run_locked(fn)

    async def _run_locked(self, fn: Callable[[Raw], T]) -> T:
        deadline = anyio.current_time() + self._deadline if self._deadline else float("inf")
        with anyio.CancelScope(deadline=deadline) as scope:
            try:
                return await anyio.to_thread.run_sync(fn, self.raw, abandon_on_cancel=True)
            except anyio.get_cancelled_exc_class():
                if not scope.cancel_called:  # our caller was cancelled, not our deadline
                    await self._cancel_shielded()
                raise
            except psycopg.Error as exc:
                raise translate(exc) from exc
        # Only reached when the deadline fired: the server (or the path to it) is silent.
        self.give_up()
        raise OutcomeUnknownError(f"the database did not answer within {self._deadline:g} s")

    async def _cancel_shielded(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_GRACE_SECONDS) as scope:
            await anyio.to_thread.run_sync(_cancel_statement, self.raw, abandon_on_cancel=True)
        if scope.cancelled_caught:
            self.give_up()

    async def execute(
        self, query: str, params: Mapping[str, Any] | Sequence[Any] | None = None
    ) -> list[dict[str, Any]]:
        """Execute one statement; return its rows as dicts (``[]`` when it returns none)."""

        def call(raw: Raw) -> list[dict[str, Any]]:
            cur = raw.execute(cast(Any, query), params)
            return cur.fetchall() if cur.description is not None else []

        return await self.run(call)

    async def execute_tuples(
        self, query: str, params: Mapping[str, Any] | Sequence[Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Execute one statement; return its rows as tuples (binary, no dicts)."""

        def call(raw: Raw) -> list[tuple[Any, ...]]:
            with raw.cursor(row_factory=tuple_row, binary=True) as cur:
                cur.execute(cast(Any, query), params)
                return cur.fetchall() if cur.description is not None else []

        return await self.run(call)

    def give_up(self) -> None:
        """Stop using this connection: shut its socket down (waking a thread stuck on it).
        Safe from any thread; :meth:`aclose` still releases it."""
        self._given_up = True
        _shutdown_socket(self.raw)

    async def aclose(self) -> None:
        """Close the connection (idempotent, never raises, bounded by the cancel grace)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_GRACE_SECONDS):
            try:
                await anyio.to_thread.run_sync(_close, self.raw, abandon_on_cancel=True)
            except Exception:
                logger.debug("close failed", exc_info=True)


async def connect(
    url: str,
    purpose: str = "app",
    options: DbOptions | None = None,
    *,
    statement_timeout: bool = True,
    autocommit: bool = True,
    server_settings: Mapping[str, str] | None = None,
) -> Connection:
    """Open a :class:`Connection` (see :func:`~.connect.connect_sync` for the settings;
    ``application_name`` is ``qdworker-<purpose>``). Raises :class:`DatabaseUnavailableError`
    or :class:`DatabaseError`; never shows a password."""
    options = options or DbOptions()
    raw = await anyio.to_thread.run_sync(
        lambda: connect_sync(
            url,
            purpose,
            options,
            autocommit=autocommit,
            statement_timeout=statement_timeout,
            server_settings=server_settings,
        ),
        abandon_on_cancel=True,
    )
    deadline = options.client_deadline_seconds if statement_timeout else None
    return Connection(raw, deadline=deadline)


class Link:
    """A connection that reopens itself; the one reconnect policy.

    :meth:`run` runs a function on a live connection. When the connection is down:

    * ``persistent=True`` (services): wait, reconnecting with :class:`~.connect.Backoff`
      (forever, until cancelled); the outage is logged once through
      :data:`~.connect.OUTAGE`;
    * ``persistent=False`` (the client API): one attempt; if it fails,
      :class:`DatabaseUnavailableError` (nothing was written) reaches the caller, and the next
      call tries again.

    A statement cut off by a broken connection raises :class:`OutcomeUnknownError`, unless
    the caller says it is ``idempotent`` (then it is run again on a new connection). One found
    broken before sending is always run again. ``on_connect(conn)`` runs after every (re)connect
    (``LISTEN``, checks); its failure counts as a failed attempt. Owns its connection:
    :meth:`aclose` it.
    """

    def __init__(
        self,
        url: str,
        purpose: str,
        options: DbOptions,
        *,
        persistent: bool = True,
        statement_timeout: bool = True,
        on_connect: Callable[[Connection], Awaitable[None]] | None = None,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self._server_settings = server_settings
        self.purpose = purpose
        self._options = options
        self._persistent = persistent
        self._statement_timeout = statement_timeout
        self._on_connect = on_connect
        self._conn: Connection | None = None
        self._lock = anyio.Lock()
        #: Connections opened, and connections lost (statistics).
        self.connects = 0
        self.losses = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def connection(self, *, wait: bool | None = None) -> Connection:
        """The live connection, (re)opened if needed (see the class docstring). ``wait``
        overrides ``persistent`` for this call (``False``: a single attempt)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            await self._drop()
            self._conn = await self._open(self._persistent if wait is None else wait)
            return self._conn

    async def _open(self, persistent: bool) -> Connection:
        backoff = Backoff()
        while True:
            conn: Connection | None = None
            try:
                conn = await connect(
                    self.url,
                    self.purpose,
                    self._options,
                    statement_timeout=self._statement_timeout,
                    server_settings=self._server_settings,
                )
                if self._on_connect is not None:
                    await self._on_connect(conn)
            except DatabaseError as exc:
                if conn is not None:
                    await conn.aclose()
                OUTAGE.failed(exc)
                if not persistent:
                    raise
                delay = backoff.next()
                if is_configuration_problem(exc):
                    delay = max(delay, CONFIGURATION_RETRY_SECONDS)
                await anyio.sleep(delay)
                continue
            except BaseException:
                if conn is not None:
                    await conn.aclose()
                raise
            OUTAGE.reached()
            self.connects += 1
            if self.connects > 1:
                OUTAGE.reconnected()
            return conn

    async def run(self, fn: Callable[[Raw], T], *, idempotent: bool = False) -> T:
        """``fn(raw)`` on a live connection; see the class docstring for failures. A
        non-persistent link tries a second time at most once."""
        retried = False
        while True:
            conn = await self.connection()
            try:
                return await conn.run(fn)
            except DatabaseUnavailableError as exc:  # nothing was sent
                self.discard(conn, exc)
                if retried and not self._persistent:
                    raise
            except OutcomeUnknownError as exc:
                self.discard(conn, exc)
                if not idempotent or (retried and not self._persistent):
                    raise
            retried = True

    async def execute(
        self,
        query: str,
        params: Mapping[str, Any] | Sequence[Any] | None = None,
        *,
        idempotent: bool = False,
    ) -> list[dict[str, Any]]:
        """One statement on a live connection; rows as dicts."""

        def call(raw: Raw) -> list[dict[str, Any]]:
            cur = raw.execute(cast(Any, query), params)
            return cur.fetchall() if cur.description is not None else []

        return await self.run(call, idempotent=idempotent)

    def discard(self, conn: Connection, exc: BaseException) -> None:
        """A connection broke: give it up; the next call reconnects. Logged at debug level
        only: a failed reconnect is what starts an outage (and its one warning)."""
        conn.give_up()
        self.losses += 1
        logger.debug("%s connection lost: %s", self.purpose, exc)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    async def aclose(self) -> None:
        """Close the connection (idempotent, never raises)."""
        await self._drop()

    async def __aenter__(self) -> Link:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def wait_until_reachable(url: str, options: DbOptions, wait_seconds: float) -> None:
    """Return once ``url`` accepts a connection; retry for up to ``wait_seconds``.

    Raises :class:`DatabaseUnavailableError` naming the cause: at once for refusals only a
    change of settings fixes (wrong password, missing database), else after ``wait_seconds``.
    """
    deadline = anyio.current_time() + wait_seconds
    backoff = Backoff()
    while True:
        try:
            conn = await connect(url, "supervisor", options)
        except DatabaseError as exc:
            if is_configuration_problem(exc) or anyio.current_time() >= deadline:
                raise DatabaseUnavailableError(
                    f"{exc} (waited {wait_seconds:g} s: QDWORKER_STARTUP_TIMEOUT)"
                    if not is_configuration_problem(exc)
                    else str(exc),
                    sqlstate=exc.sqlstate,
                ) from exc
            OUTAGE.failed(exc)
            await anyio.sleep(min(backoff.next(), max(0.0, deadline - anyio.current_time())))
            continue
        await conn.aclose()
        OUTAGE.reached()
        return
