"""The connections of a :class:`~qdworker.testing.TcpProxy` and the forwarding between their
two sides, driven by the proxy's selector loop.

:class:`Relay` keeps one :class:`Conn` per accepted client: the client socket, the socket to
the target, and what was read from one side and not yet written to the other. It connects
clients to the target (or holds them back while not forwarding), reads what the selector says
is readable, writes what it can, passes an EOF on as a half-close (``shutdown(SHUT_WR)``) once
everything read before it was delivered, and closes a connection when both directions are
done. At most :data:`MAX_PENDING_BYTES` wait per direction and connection; when that is full
it stops reading from the sending side (backpressure). While not forwarding it neither reads
nor writes (its selector interest is empty). Sockets get ``TCP_NODELAY``.

Not thread-safe: only the proxy's loop thread calls it (the proxy hands its control calls to
that thread).

Errors: a socket error on one side (reset, broken pipe …) or a refused connection to the
target resets both sides of that connection (RST, ``SO_LINGER`` 0) and is logged; nothing
is raised to the loop except programming errors. Resources: every client and target socket
of its connections, and their registrations in the proxy's selector (it does not own the
selector itself); :meth:`Relay.abort_all` releases all of them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import struct
from typing import Final, Literal

logger = logging.getLogger("qdworker.testing.proxy")

MAX_PENDING_BYTES: Final = 256 * 1024
"""Per connection and direction: bytes read but not yet delivered, at most."""
RECV_CHUNK_BYTES: Final = 64 * 1024

Side = Literal["client", "server"]
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def _reset(sock: socket.socket) -> None:
    """Close `sock` with a RST where possible (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Conn:
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


class Relay:
    """The connections of one proxy (see the module docstring). `owner` names the proxy in
    log lines; :meth:`start` hands over the selector and the target address."""

    def __init__(self, owner: object) -> None:
        self._owner = owner
        self._sel: selectors.BaseSelector | None = None
        self._target_addr: tuple[socket.AddressFamily, tuple[str, int]] | None = None
        self._conns: list[Conn] = []
        self._masks: dict[socket.socket, int] = {}
        self.forwarding = True
        self.bytes_to_server = 0
        self.bytes_to_client = 0
        self.connection_count = 0
        self.accepted_total = 0

    def start(
        self,
        sel: selectors.BaseSelector,
        target_addr: tuple[socket.AddressFamily, tuple[str, int]],
    ) -> None:
        self._sel = sel
        self._target_addr = target_addr

    def set_forwarding(self, forwarding: bool) -> None:
        """Stop or resume forwarding; on resume, connect the clients held back."""
        self.forwarding = forwarding
        if forwarding:
            for conn in list(self._conns):  # _connect may drop a connection
                if conn.server is None:
                    self._connect(conn)

    def accept(self, listener: socket.socket) -> None:
        """Accept every pending client of `listener` (non-blocking)."""
        while True:
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # e.g. EMFILE: leave it in the backlog
                logger.warning("%r: accept failed: %s", self._owner, e)
                return
            client.setblocking(False)
            _nodelay(client)
            conn = Conn(client)
            self._conns.append(conn)
            self.connection_count = len(self._conns)
            self.accepted_total += 1
            if self.forwarding:
                self._connect(conn)

    def _connect(self, conn: Conn) -> None:
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
            self._connect_failed(conn, err)

    def _connect_failed(self, conn: Conn, err: int) -> None:
        logger.info(
            "%r: connecting to the target failed: %s", self._owner, errno.errorcode.get(err)
        )
        self._abort(conn)

    def on_event(self, conn: Conn, side: Side, mask: int) -> None:
        """The selector reported `mask` for `side` of `conn` (ignored if it is gone)."""
        if conn not in self._conns:
            return
        try:
            if side == "server" and conn.connecting:
                assert conn.server is not None
                err = conn.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._connect_failed(conn, err)
                    return
                conn.connecting = False
            if mask & selectors.EVENT_READ:
                self._read(conn, side)
            self._pump(conn)
        except OSError as e:  # reset, broken pipe, ...: reset the other side too
            logger.debug("%r: connection error on the %s side: %s", self._owner, side, e)
            self._abort(conn)

    def _read(self, conn: Conn, side: Side) -> None:
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

    def _pump(self, conn: Conn) -> None:
        """Write what can be written, pass EOFs on, close the connection when done."""
        if not self.forwarding:
            return
        server = conn.server
        if server is not None and not conn.connecting:
            if conn.to_server:
                self.bytes_to_server += self._send(server, conn.to_server)
            if conn.client_eof and not conn.to_server and not conn.server_shut:
                server.shutdown(socket.SHUT_WR)
                conn.server_shut = True
        if conn.to_client:
            self.bytes_to_client += self._send(conn.client, conn.to_client)
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

    def _interest(self, conn: Conn, side: Side) -> int:
        if not self.forwarding:
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

    def update_interest(self) -> None:
        """Register with the selector what each socket waits for now."""
        for conn in self._conns:
            self._set_mask(conn.client, self._interest(conn, "client"), (conn, "client"))
            if conn.server is not None:
                self._set_mask(conn.server, self._interest(conn, "server"), (conn, "server"))

    def _set_mask(self, sock: socket.socket, mask: int, data: tuple[Conn, Side]) -> None:
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

    def _close_conn(self, conn: Conn, *, reset: bool) -> None:
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
        self.connection_count = len(self._conns)

    def _abort(self, conn: Conn) -> None:
        self._close_conn(conn, reset=True)

    def abort_all(self) -> None:
        """Reset (RST) every connection, both sides."""
        for conn in list(self._conns):
            self._abort(conn)
