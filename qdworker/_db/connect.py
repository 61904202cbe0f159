"""Opening connections, and what happens when the database goes away: the one place for both.

Every connection qdworker opens (worker claim, completion, leases, LISTEN, job SQL, supervisor,
relay, client API, CLI) is opened by :func:`connect_sync` with the same settings:

* **dead-peer detection**: TCP keepalives and ``tcp_user_timeout`` derived from
  :attr:`DbOptions.timeout_seconds` (``QDWORKER_DB_TIMEOUT``, default 10 s), so a connection
  whose peer vanished (host down, network dropping packets) fails within about that long
  instead of hanging for the kernel's two hours; values set in the URL win;
* **a statement timeout** on qdworker's own statements (the same number of seconds, sent as
  the ``statement_timeout`` startup option); job handlers' connections have none;
* ``connect_timeout`` (the same, at least 2 s) and ``application_name`` ``qdworker-<purpose>``.

Errors: :func:`translate` maps every psycopg error into :mod:`qdworker.errors`, with a message
that names the cause (wrong password, database missing, too many connections, server down …)
and never the password. :func:`is_transient` says whether retrying can help.

Reconnecting: :class:`Backoff` is the one retry policy (exponential, jittered, capped at
:data:`RECONNECT_MAX_SECONDS`); :data:`OUTAGE` is the process-wide record of whether the
database is reachable, which logs one warning when an outage starts and one line when it ends,
however many connections fail and retry in between. Both are thread-safe.
"""

from __future__ import annotations

import errno
import math
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from .._logs import module_logger
from .._redact import redact
from ..errors import DatabaseError, DatabaseUnavailableError, OutcomeUnknownError

logger = module_logger(__name__)

DEFAULT_TIMEOUT_SECONDS: Final = 10.0
#: First reconnect delay; doubles (with jitter) up to :data:`RECONNECT_MAX_SECONDS`.
RECONNECT_MIN_SECONDS: Final = 0.05
#: Longest pause between two attempts to reach the database: a connection is back at most
#: about this long after the database is.
RECONNECT_MAX_SECONDS: Final = 1.0
#: TCP keepalive probes before a silent peer is declared dead.
KEEPALIVE_COUNT: Final = 3

#: Connection exceptions (class 08), and the codes that mean "the server went away or cannot
#: take us now": admin/crash shutdown, cannot connect now, too many connections; plus
#: serialization failures, deadlocks, lock timeouts and statement timeouts (qdworker's own
#: statements are safe to repeat).
_TRANSIENT_CLASSES: Final = ("08",)
_TRANSIENT_CODES: Final = frozenset(
    {"40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "53300", "53400"}
)
#: Refusals that waiting will not fix: bad password, no such database or role, no permission.
_CONFIGURATION_CODES: Final = frozenset({"28P01", "28000", "3D000", "42501", "42704"})

_HINTS: Final = {
    "28P01": "wrong password",
    "28000": "the server refused this user or host (check the user name and pg_hba.conf)",
    "3D000": "the database does not exist",
    "42501": "permission denied",
    "53300": "too many connections: the server's max_connections (or the role's connection "
    "limit) is reached",
    "53400": "a configured limit of the server is exceeded",
    "57P01": "the server closed the connection (shutdown or pg_terminate_backend)",
    "57P02": "the server closed the connection (crash shutdown)",
    "57P03": "the server is starting up, shutting down or in recovery",
    "57014": "the statement timed out (statement_timeout) or was cancelled",
}


@dataclass(frozen=True)
class DbOptions:
    """How qdworker's connections detect trouble; one value, ``QDWORKER_DB_TIMEOUT``.

    A connection whose peer stops answering fails within about :attr:`timeout_seconds`; a
    statement of qdworker's own fails after that long on the server (``statement_timeout``)
    and a little later on the client (:attr:`client_deadline_seconds`), so a black-holed
    network is noticed even where TCP itself would wait.
    """

    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

    @property
    def client_deadline_seconds(self) -> float:
        """How long the client waits for any answer before it gives the connection up."""
        return self.timeout_seconds + 2.0

    def libpq_settings(
        self, *, statement_timeout: bool, server_settings: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """libpq connection parameters; ``server_settings`` are run-time settings of the
        session (``-c name=value`` startup options), as is the statement timeout."""
        seconds = self.timeout_seconds
        settings: dict[str, Any] = {
            "connect_timeout": max(2, math.ceil(seconds)),
            "keepalives": 1,
            "keepalives_idle": max(1, math.ceil(seconds / 2)),
            "keepalives_interval": max(1, math.ceil(seconds / (2 * KEEPALIVE_COUNT))),
            "keepalives_count": KEEPALIVE_COUNT,
            "tcp_user_timeout": max(1000, int(seconds * 1000)),
        }
        session = dict(server_settings or {})
        if statement_timeout:
            session["statement_timeout"] = str(int(seconds * 1000))
        if session:
            settings["options"] = " ".join(f"-c {k}={v}" for k, v in session.items())
        return settings


#: Session settings of the connections that run the hot path's few statements again and
#: again (claims): plan each prepared statement once. Left to itself, Postgres
#: plans the claim afresh on every execution (its first custom plans look cheaper than the
#: generic one), which costs more than running it (measured: 1,000 vs 540 us a claim).
GENERIC_PLANS: Final = {"plan_cache_mode": "force_generic_plan"}


def _settings_for(
    url: str,
    options: DbOptions,
    *,
    statement_timeout: bool,
    server_settings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Our defaults for what ``url`` does not set itself (the user's URL wins)."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise DatabaseError(f"invalid database URL {redact(url)!r}: {exc}") from None
    ours = options.libpq_settings(
        statement_timeout=statement_timeout, server_settings=server_settings
    )
    if "options" in given and "options" in ours:
        ours["options"] = f"{given['options']} {ours['options']}"
    return {key: value for key, value in ours.items() if key == "options" or key not in given}


def connect_sync(
    url: str,
    purpose: str,
    options: DbOptions,
    *,
    autocommit: bool = True,
    statement_timeout: bool = True,
    server_settings: Mapping[str, str] | None = None,
    row_factory: Any = dict_row,
) -> psycopg.Connection[Any]:
    """Open a connection (blocking; run it in a thread from async code). ``server_settings``
    are session settings (``{"plan_cache_mode": "force_generic_plan"}``).

    Raises :class:`~qdworker.errors.DatabaseUnavailableError` or
    :class:`~qdworker.errors.DatabaseError` (see :func:`translate`); the caller owns the
    connection it returns.
    """
    try:
        return psycopg.connect(
            url,
            autocommit=autocommit,
            row_factory=row_factory,
            application_name=f"qdworker-{purpose}",
            **_settings_for(
                url, options, statement_timeout=statement_timeout, server_settings=server_settings
            ),
        )
    except psycopg.Error as exc:
        raise translate(exc, connecting_to=url) from exc


#: Refusals libpq reports while connecting carry no SQLSTATE: recognised by their text (the
#: server's own English messages; a server speaking another language is simply not recognised).
_CONNECT_REFUSALS: Final = (
    (("password authentication failed",), "28P01"),
    (("no pg_hba.conf entry",), "28000"),
    (('role "', "does not exist"), "28000"),
    (('database "', "does not exist"), "3D000"),
    (("too many clients already",), "53300"),
    (("remaining connection slots are reserved",), "53300"),
    (("the database system is starting up",), "57P03"),
    (("the database system is shutting down",), "57P03"),
    (("the database system is in recovery mode",), "57P03"),
    (("the database system is not yet accepting connections",), "57P03"),
)


def sqlstate_of(exc: BaseException) -> str | None:
    """The error's SQLSTATE, or the one a connection-time refusal means (see above)."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate
    if isinstance(exc, psycopg.OperationalError):
        text = str(exc)
        for needles, code in _CONNECT_REFUSALS:
            if all(needle in text for needle in needles):
                return code
    return None


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    sqlstate = sqlstate_of(exc)
    hint = _HINTS.get(sqlstate or "")
    if hint is None and "connection refused" in text.lower():
        hint = "nothing accepts connections there: is Postgres running?"
    elif hint is None and "timeout expired" in text.lower():
        hint = "no answer in time: is the host reachable?"
    parts = [redact(text)]
    if hint:
        parts.append(f"({hint})")
    if sqlstate:
        parts.append(f"[SQLSTATE {sqlstate}]")
    return " ".join(parts)


def translate(
    exc: BaseException, *, connecting_to: str | None = None, sent: bool = True
) -> DatabaseError:
    """The :mod:`qdworker.errors` exception for a psycopg (or socket) error.

    * while connecting (``connecting_to`` given): :class:`DatabaseUnavailableError`, naming
      the URL (password hidden) and the cause;
    * the connection broke: :class:`OutcomeUnknownError` if the statement may have reached
      the server (``sent``), else :class:`DatabaseUnavailableError`;
    * anything else (a constraint, a syntax error …): :class:`DatabaseError` with its SQLSTATE.
    """
    if isinstance(exc, DatabaseError):
        return exc
    sqlstate = sqlstate_of(exc)
    if connecting_to is not None:
        return DatabaseUnavailableError(
            f"cannot connect to {redact(connecting_to)}: {_cause(exc)}", sqlstate=sqlstate
        )
    if _is_connection_failure(exc):
        if not sent or "could not send data" in str(exc):
            return DatabaseUnavailableError(
                f"the database connection is broken: {_cause(exc)}; nothing was sent",
                sqlstate=sqlstate,
            )
        return OutcomeUnknownError(
            f"the database connection broke while the statement ran: {_cause(exc)}; "
            "whether it was committed is unknown",
            sqlstate=sqlstate,
        )
    return DatabaseError(redact(" ".join(str(exc).split())), sqlstate=sqlstate)


def _is_connection_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, psycopg.OperationalError) and sqlstate is None:
        return True
    if isinstance(exc, psycopg.InterfaceError):
        return True  # "the connection is closed" and the like
    if not isinstance(sqlstate, str):
        return False
    return sqlstate.startswith("08") or sqlstate in {"57P01", "57P02"}


def is_transient(exc: BaseException) -> bool:
    """True if retrying (on a new connection if the old one broke) may succeed."""
    if isinstance(exc, DatabaseUnavailableError | OutcomeUnknownError):
        return not is_configuration_problem(exc)
    if isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None:
        return True
    if isinstance(exc, OSError):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is None:
        return False
    return sqlstate.startswith(_TRANSIENT_CLASSES) or sqlstate in _TRANSIENT_CODES


def is_configuration_problem(exc: BaseException) -> bool:
    """True for refusals that only a change of settings fixes (password, database name …)."""
    return getattr(exc, "sqlstate", None) in _CONFIGURATION_CODES


def server_is_down(exc: BaseException, url: str) -> bool:
    """True if a failed connection attempt shows that the server itself is down for every
    client, not just unreachable from here: the only host of ``url`` refused the connection
    (or its unix socket is gone), or said it is starting up or shutting down.

    The lease keeper uses this to keep running jobs alive through a database restart (see
    ``docs/reliability.md``); with several hosts in the URL it always answers False.
    """
    try:
        host = str(conninfo_to_dict(url).get("host") or "")
    except psycopg.ProgrammingError:
        return False
    if "," in host:
        return False
    if getattr(exc, "sqlstate", None) == "57P03":
        return True
    cause = exc.__cause__ if isinstance(exc, DatabaseError) else exc
    if isinstance(cause, OSError):
        return cause.errno in (errno.ECONNREFUSED, errno.ENOENT)
    text = str(cause or exc).lower()
    return "connection refused" in text or "no such file or directory" in text


class Backoff:
    """Exponential backoff with jitter: each :meth:`next` delay is drawn from [d/2, d], with d
    doubling from ``initial`` to ``maximum``; :meth:`reset` after a success."""

    def __init__(
        self, initial: float = RECONNECT_MIN_SECONDS, maximum: float = RECONNECT_MAX_SECONDS
    ) -> None:
        self._initial = initial
        self._maximum = maximum
        self._current = initial

    def next(self) -> float:
        delay = self._current
        self._current = min(self._current * 2, self._maximum)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._current = self._initial


class Outage:
    """Whether the database is reachable, for the whole process; thread-safe.

    :meth:`failed` after a connection attempt failed, :meth:`reached` after one succeeded.
    The first failure while reachable logs one warning naming the cause; the first success
    after that logs one info line with the outage's length. Connections that break and
    reconnect at once (a terminated backend) are no outage and log nothing above debug.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None
        #: Outages seen by this process (statistics).
        self.outages = 0
        #: Connections that replaced a broken one (:meth:`reconnected`; statistics).
        self.reconnects = 0

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self.outages += 1
        cause = str(exc) if isinstance(exc, DatabaseError) else _cause(exc)  # translated: hints in
        logger.warning(
            "database unreachable: %s; reconnecting (at most %g s apart)",
            cause,
            RECONNECT_MAX_SECONDS,
        )

    def reconnected(self) -> None:
        """Count a connection that replaced one that broke."""
        with self._lock:
            self.reconnects += 1

    def reached(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            lasted = time.monotonic() - self._down_since
            self._down_since = None
        logger.info("database reachable again after %.1f s", lasted)


#: The process's outage record (see :class:`Outage`).
OUTAGE: Final = Outage()


def describe(exc: BaseException) -> str:
    """A one-line description of a database error for logs (no password, with hints)."""
    return _cause(exc)
