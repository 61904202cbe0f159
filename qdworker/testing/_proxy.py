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
one side is passed on as a half-close (``shutdown(SHUT_WR)``) once everything read before
it was delivered; a reset or socket error on one side resets both.  At most
:data:`MAX_PENDING_BYTES` wait per direction and connection; when that is full the proxy
stops reading from the sending side (backpressure) instead of buffering more.  Sockets get
``TCP_NODELAY``.

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
import errno
import logging
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final, Literal, Self

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["TcpProxy"]

logger = logging.getLogger(__name__)

MAX_PENDING_BYTES: Final = 256 * 1024
"""Per connection and direction: bytes read but not yet delivered, at most."""
RECV_CHUNK_BYTES: Final = 64 * 1024
CONTROL_TIMEOUT_SECONDS: Final = 5.0
"""How long a control method waits for the loop thread to apply it."""
CLOSE_TIMEOUT_SECONDS: Final = 5.0
"""How long :meth:`TcpProxy.close` waits for the loop thread to exit."""
LISTEN_BACKLOG: Final = 128

_Side = Literal["client", "server"]
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def _reset(sock: socket.socket) -> None:
    """Close `sock` with a RST where possible (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Conn:
    """One proxied connection: the accepted client socket, the socket to the target, and
    what was read from one and not yet written to the other."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.connecting = False
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.client_eof = False  # the client sent FIN (read returned b"")
        self.server_eof = False
        self.server_shut = False  # we passed the client's FIN on to the target
        self.client_shut = False

    def done(self) -> bool:
        return self.client_shut and self.server_shut


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
        self._target_addr: tuple[socket.AddressFamily, tuple[str, int]] | None = None
        self._conns: list[_Conn] = []
        self._masks: dict[socket.socket, int] = {}
        self._commands: collections.deque[tuple[Callable[[], None], threading.Event]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._forwarding = True
        self._stopping = False
        self._loop_running = False  # guarded by _lock: commands are queued only while True
        self._closed = False
        self._error: BaseException | None = None
        self._bytes_to_server = 0
        self._bytes_to_client = 0
        self._connection_count = 0
        self._accepted_total = 0

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
            self._target_addr = (family, (str(addr[0]), int(addr[1])))
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
        return self._forwarding

    def blackhole(self) -> None:
        """Stop forwarding (see the module docstring); nothing is closed."""
        self._call(self._set_forwarding_false)

    def restore(self) -> None:
        """Forward again; held-back data and connections go through now."""
        self._call(self._set_forwarding_true)

    def cut(self) -> None:
        """Reset (RST) every current connection, both sides; keep listening."""
        self._call(self._abort_all)

    def connections(self) -> int:
        """Client connections currently open through the proxy (including those held
        back by a blackhole)."""
        return self._connection_count

    @property
    def accepted_total(self) -> int:
        """Client connections accepted since :meth:`start`."""
        return self._accepted_total

    @property
    def bytes_to_server(self) -> int:
        """Bytes delivered from clients to the target since :meth:`start`."""
        return self._bytes_to_server

    @property
    def bytes_to_client(self) -> int:
        """Bytes delivered from the target to clients since :meth:`start`."""
        return self._bytes_to_client

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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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

    def _set_forwarding_false(self) -> None:
        self._forwarding = False

    def _set_forwarding_true(self) -> None:
        self._forwarding = True
        for conn in list(self._conns):  # _connect may drop a connection
            if conn.server is None:
                self._connect(conn)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stopping:
                self._update_interest()
                for key, mask in sel.select():
                    what = key.data
                    if what == "listen":
                        self._accept()
                    elif what == "wake":
                        self._drain_wake()
                    else:
                        conn, side = what
                        if conn in self._conns:
                            self._on_event(conn, side, mask)
                self._run_commands()
        except BaseException as e:
            self._error = e
            logger.exception("%r: loop thread failed", self)
        finally:
            with self._lock:
                self._loop_running = False
                self._abort_all()
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

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # e.g. EMFILE: leave it in the backlog
                logger.warning("%r: accept failed: %s", self, e)
                return
            client.setblocking(False)
            _nodelay(client)
            conn = _Conn(client)
            self._conns.append(conn)
            self._connection_count = len(self._conns)
            self._accepted_total += 1
            if self._forwarding:
                self._connect(conn)

    def _connect(self, conn: _Conn) -> None:
        assert self._target_addr is not None
        family, addr = self._target_addr
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setblocking(False)
        _nodelay(server)
        conn.server = server
        err = server.connect_ex(addr)
        if err in (0, errno.EINPROGRESS):
            conn.connecting = err != 0
        else:
            logger.info("%r: connecting to the target failed: %s", self, errno.errorcode.get(err))
            self._abort(conn)

    def _on_event(self, conn: _Conn, side: _Side, mask: int) -> None:
        try:
            if side == "server" and conn.connecting:
                assert conn.server is not None
                err = conn.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    logger.info(
                        "%r: connecting to the target failed: %s", self, errno.errorcode.get(err)
                    )
                    self._abort(conn)
                    return
                conn.connecting = False
            if mask & selectors.EVENT_READ:
                self._read(conn, side)
            self._pump(conn)
        except OSError as e:  # reset, broken pipe, ...: reset the other side too
            logger.debug("%r: connection error on the %s side: %s", self, side, e)
            self._abort(conn)

    def _read(self, conn: _Conn, side: _Side) -> None:
        sock, buf = (
            (conn.client, conn.to_server) if side == "client" else (conn.server, conn.to_client)
        )
        assert sock is not None
        room = MAX_PENDING_BYTES - len(buf)
        if room <= 0:
            return
        try:
            data = sock.recv(min(room, RECV_CHUNK_BYTES))
        except BlockingIOError:
            return
        if not data:
            if side == "client":
                conn.client_eof = True
            else:
                conn.server_eof = True
        else:
            buf += data

    def _pump(self, conn: _Conn) -> None:
        """Write what can be written, pass EOFs on, close the connection when done."""
        if not self._forwarding:
            return
        server = conn.server
        if server is not None and not conn.connecting:
            if conn.to_server:
                n = self._send(server, conn.to_server)
                self._bytes_to_server += n
            if conn.client_eof and not conn.to_server and not conn.server_shut:
                server.shutdown(socket.SHUT_WR)
                conn.server_shut = True
        if conn.to_client:
            n = self._send(conn.client, conn.to_client)
            self._bytes_to_client += n
        if conn.server_eof and not conn.to_client and not conn.client_shut:
            conn.client.shutdown(socket.SHUT_WR)
            conn.client_shut = True
        if conn.done():
            self._close_conn(conn, reset=False)

    @staticmethod
    def _send(sock: socket.socket, buf: bytearray) -> int:
        try:
            n = sock.send(buf)
        except BlockingIOError:
            return 0
        del buf[:n]
        return n

    def _interest(self, conn: _Conn, side: _Side) -> int:
        if not self._forwarding:
            return 0
        mask = 0
        if side == "client":
            if not conn.client_eof and len(conn.to_server) < MAX_PENDING_BYTES:
                mask |= selectors.EVENT_READ
            if conn.to_client:
                mask |= selectors.EVENT_WRITE
        else:
            if conn.connecting:
                return selectors.EVENT_WRITE
            if not conn.server_eof and len(conn.to_client) < MAX_PENDING_BYTES:
                mask |= selectors.EVENT_READ
            if conn.to_server:
                mask |= selectors.EVENT_WRITE
        return mask

    def _update_interest(self) -> None:
        for conn in self._conns:
            self._set_mask(conn.client, self._interest(conn, "client"), (conn, "client"))
            if conn.server is not None:
                self._set_mask(conn.server, self._interest(conn, "server"), (conn, "server"))

    def _set_mask(self, sock: socket.socket, mask: int, data: tuple[_Conn, _Side]) -> None:
        sel = self._sel
        assert sel is not None
        old = self._masks.get(sock, 0)
        if mask == old:
            return
        if old == 0:
            sel.register(sock, mask, data)
        elif mask == 0:
            sel.unregister(sock)
        else:
            sel.modify(sock, mask, data)
        if mask:
            self._masks[sock] = mask
        else:
            self._masks.pop(sock, None)

    def _close_conn(self, conn: _Conn, *, reset: bool) -> None:
        for sock in (conn.client, conn.server):
            if sock is None:
                continue
            if self._masks.pop(sock, 0) and self._sel is not None:
                self._sel.unregister(sock)
            if reset:
                _reset(sock)
            else:
                sock.close()
        conn.server = None
        if conn in self._conns:
            self._conns.remove(conn)
        self._connection_count = len(self._conns)

    def _abort(self, conn: _Conn) -> None:
        self._close_conn(conn, reset=True)

    def _abort_all(self) -> None:
        for conn in list(self._conns):
            self._abort(conn)

    def _teardown(self) -> None:
        """Close everything; the loop thread is not running (any more)."""
        self._abort_all()
        if self._sel is not None:
            self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        logger.info("%r closed", self)
