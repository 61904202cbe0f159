"""A TCP proxy in front of a Postgres server, for injecting network faults in tests.

:class:`TcpProxy` listens on ``listen_host:listen_port`` (default ``127.0.0.1``, a free
port) and forwards every accepted connection to ``target_host:target_port``.  Clients may
be in any process: point them at :meth:`TcpProxy.url`.  Faults:

:meth:`~TcpProxy.blackhole`
    From now on nothing is forwarded, in either direction, on existing or new connections,
    and nothing is closed: the proxy simply stops reading and writing, so data piles up in
    kernel buffers.  This is a network that silently drops packets: the client's TCP
    connection (to the proxy) stays healthy, keepalives are answered, and only
    application-level timeouts can notice.  New connections are accepted by the kernel and
    by the proxy, but the proxy does not connect them to the target.
:meth:`~TcpProxy.restore`
    Forward again.  Data held back is delivered (as TCP retransmission would after a
    healed partition); new connections held back are connected to the target now.
:meth:`~TcpProxy.cut`
    Abruptly close every current connection, both sides, with a RST (``SO_LINGER`` 0).
    The proxy keeps listening; new connections work (unless blackholed).

Behaviour: the proxy connects to the target when a client connects (while forwarding).
If the target refuses, the client connection is reset (the client sees "server closed the
connection unexpectedly" or "connection reset", not "connection refused").  An EOF from
one side is passed on as a half-close once everything read before it was delivered; a reset
or socket error on one side resets both.  At most
:data:`~qdworker.testing._relay.MAX_PENDING_BYTES` wait per direction and connection, then
the proxy stops reading from the sending side (backpressure).  The forwarding itself is
:class:`~qdworker.testing._relay.Relay`'s.

Threads: the proxy runs a ``selectors`` loop in one daemon thread (not trio: it must work
whatever the test's event loop is).  The control methods are thread-safe and synchronous:
they hand the change to the loop (waking it through a socketpair) and return once the loop
has applied it, so after ``blackhole()`` returns no further byte is forwarded and after
``cut()`` returns the connections are closed.  They raise :class:`TimeoutError` if the loop
does not answer within :data:`CONTROL_TIMEOUT_SECONDS`, and :class:`RuntimeError` if the
loop died of an unexpected error (logged with its traceback).

Owned resources: the listening socket, the wake-up socketpair, every client and target
socket, and the thread.  :meth:`TcpProxy.close` (idempotent; also ``__exit__``) resets all
connections, closes every socket and joins the thread (bounded by
:data:`CLOSE_TIMEOUT_SECONDS`; a thread that does not exit is logged and left, as a daemon).
"""

from __future__ import annotations

import collections
import contextlib
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Final, Self

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .._logs import module_logger
from ._relay import Relay

logger = module_logger(__name__)

CONTROL_TIMEOUT_SECONDS: Final = 5.0
"""How long a control method waits for the loop thread to apply it."""
CLOSE_TIMEOUT_SECONDS: Final = 5.0
"""How long :meth:`TcpProxy.close` waits for the loop thread to exit."""
LISTEN_BACKLOG: Final = 128


class TcpProxy:
    """Forward TCP connections from ``listen_host:listen_port`` to the target; see the
    module docstring.  Call :meth:`start` (or use ``with TcpProxy(...).start() as p:``)."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self._target = (target_host, target_port)
        self._listen_addr = (listen_host, listen_port)
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._relay = Relay(self)
        self._commands: collections.deque[tuple[Callable[[], None], threading.Event]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._stopping = False
        self._loop_running = False  # guarded by _lock: commands are queued only while True
        self._closed = False
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ public API

    def start(self) -> Self:
        """Resolve the target, bind and listen, start the loop thread.  Returns self.
        Raises OSError if the address cannot be bound or the target not resolved,
        RuntimeError if already started or closed."""
        with self._lock:
            if self._thread is not None or self._closed:
                raise RuntimeError(f"{self!r} was already started (or closed)")
            info = socket.getaddrinfo(*self._target, type=socket.SOCK_STREAM)
            family, _, _, _, addr = info[0]
            target_addr = (family, (str(addr[0]), int(addr[1])))
            lfamily = socket.AF_INET6 if ":" in self._listen_addr[0] else socket.AF_INET
            listener = socket.socket(lfamily, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(self._listen_addr)
                listener.listen(LISTEN_BACKLOG)
                listener.setblocking(False)
                self._wake_r, self._wake_w = socket.socketpair()
            except BaseException:
                listener.close()
                raise
            self._listener = listener
            self._port = int(listener.getsockname()[1])
            for s in (self._wake_r, self._wake_w):
                s.setblocking(False)
            self._sel = selectors.DefaultSelector()
            self._sel.register(listener, selectors.EVENT_READ, "listen")
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._relay.start(self._sel, target_addr)
            self._thread = threading.Thread(
                target=self._run, name=f"qdworker-tcp-proxy-{self.port}", daemon=True
            )
            self._loop_running = True
            self._thread.start()
        logger.info("%r started", self)
        return self

    @property
    def port(self) -> int:
        """The port the proxy listens on.  RuntimeError before :meth:`start`."""
        if self._port is None:
            raise RuntimeError(f"{self!r} is not started")
        return self._port

    @property
    def host(self) -> str:
        """The address clients should connect to (``127.0.0.1`` for a wildcard listener)."""
        host = self._listen_addr[0]
        if host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if host == "::":
            return "::1"
        return host

    def url(self, server_url: str) -> str:
        """`server_url` (a libpq URL or conninfo string) with host and port replaced by the
        proxy's, as a conninfo string (``key=value`` form).  A multi-host `server_url`
        becomes single-host: the proxy forwards to one target only."""
        params = conninfo_to_dict(server_url)
        params.pop("hostaddr", None)
        params["host"] = self.host
        params["port"] = str(self.port)
        return make_conninfo("", **params)

    @property
    def forwarding(self) -> bool:
        """False between :meth:`blackhole` and :meth:`restore`."""
        return self._relay.forwarding

    def blackhole(self) -> None:
        """Stop forwarding (see the module docstring); nothing is closed."""
        self._call(lambda: self._relay.set_forwarding(False))

    def restore(self) -> None:
        """Forward again; held-back data and connections go through now."""
        self._call(lambda: self._relay.set_forwarding(True))

    def cut(self) -> None:
        """Reset (RST) every current connection, both sides; keep listening."""
        self._call(self._relay.abort_all)

    def connections(self) -> int:
        """Client connections currently open through the proxy (including those held
        back by a blackhole)."""
        return self._relay.connection_count

    @property
    def accepted_total(self) -> int:
        """Client connections accepted since :meth:`start`."""
        return self._relay.accepted_total

    @property
    def bytes_to_server(self) -> int:
        """Bytes delivered from clients to the target since :meth:`start`."""
        return self._relay.bytes_to_server

    @property
    def bytes_to_client(self) -> int:
        """Bytes delivered from the target to clients since :meth:`start`."""
        return self._relay.bytes_to_client

    def close(self) -> None:
        """Reset every connection, close every socket, join the thread.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._stopping = True
            self._wake()
            thread.join(CLOSE_TIMEOUT_SECONDS)
            if thread.is_alive():
                logger.warning(
                    "%r: loop thread did not exit within %s s", self, CLOSE_TIMEOUT_SECONDS
                )
                return
        self._teardown()

    def __enter__(self) -> Self:
        """Starts the proxy if it is not started yet; ``__exit__`` closes it."""
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        port = self._port if self._port is not None else self._listen_addr[1]
        return f"TcpProxy({self.host}:{port} -> {self._target[0]}:{self._target[1]})"

    # ------------------------------------------------------------------ control plumbing

    def _call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread and wait for it (directly if there is no loop)."""
        if self._error is not None:
            raise RuntimeError(f"{self!r}: loop thread died: {self._error!r}")
        done = threading.Event()
        with self._lock:
            if not self._loop_running:  # not started, or closed: no sockets to act on
                fn()
                return
            self._commands.append((fn, done))
        self._wake()
        if not done.wait(CONTROL_TIMEOUT_SECONDS):
            raise TimeoutError(
                f"{self!r}: loop thread did not answer within {CONTROL_TIMEOUT_SECONDS} s"
            )
        if self._error is not None:
            raise RuntimeError(f"{self!r}: loop thread died: {self._error!r}")

    def _wake(self) -> None:
        if self._wake_w is None:
            return
        with contextlib.suppress(OSError):  # BlockingIOError: already awake; else closing
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        sel, listener = self._sel, self._listener
        assert sel is not None and listener is not None
        try:
            while not self._stopping:
                self._relay.update_interest()
                for key, mask in sel.select():
                    what = key.data
                    if what == "listen":
                        self._relay.accept(listener)
                    elif what == "wake":
                        self._drain_wake()
                    else:
                        conn, side = what
                        self._relay.on_event(conn, side, mask)
                self._run_commands()
        except BaseException as e:
            self._error = e
            logger.exception("%r: loop thread failed", self)
        finally:
            with self._lock:
                self._loop_running = False
                self._relay.abort_all()
                self._run_commands()  # release the waiters; nothing more reaches the queue

    def _run_commands(self) -> None:
        while self._commands:
            fn, done = self._commands.popleft()
            try:
                if self._error is None:
                    fn()
            finally:
                done.set()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _teardown(self) -> None:
        """Close everything; the loop thread is not running (any more)."""
        self._relay.abort_all()
        if self._sel is not None:
            self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        logger.info("%r closed", self)
