"""TCP ports for :class:`~qdworker.testing.PostgresServer`: picked so that nothing else takes
them while a server is down.

:func:`reserve_port` picks a port below the kernel's ephemeral range (so client sockets cannot
take it while the server is down) that nothing listens on, and remembers it until
:func:`release_port`, so this process never hands out one port twice. Another process may
still bind it before the server does (then the server's start fails). If the ephemeral range
leaves less than 1000 ports below it, the kernel picks one instead. Linux only (reads
``/proc``; elsewhere the range is assumed to start at 32768). Thread-safe.

Errors: :class:`~qdworker.errors.EmbeddedDatabaseError` if no free port is found. Resources:
the set of reserved port numbers (no sockets are kept open).
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path
from typing import Final

from ..errors import EmbeddedDatabaseError

_PORT_RANGE_LOW: Final = 20000  # ports are picked in [this, start of the ephemeral range)
_PORT_ATTEMPTS: Final = 200
_reserved_ports: set[int] = set()
_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def reserve_port(host: str) -> int:
    """A port on `host` (IPv4) that nothing listens on and that is not reserved already."""
    high = _ephemeral_low()
    with _lock:
        if high - _PORT_RANGE_LOW >= 1000:
            for _ in range(_PORT_ATTEMPTS):
                port = random.randrange(_PORT_RANGE_LOW, high)
                if port not in _reserved_ports and _port_free(host, port):
                    _reserved_ports.add(port)
                    return port
        for _ in range(_PORT_ATTEMPTS):  # odd port range: let the kernel choose
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _reserved_ports:
                _reserved_ports.add(port)
                return port
    raise EmbeddedDatabaseError(f"no free TCP port found on {host}")


def release_port(port: int) -> None:
    """Forget `port` (its server is closed); unknown ports are ignored."""
    with _lock:
        _reserved_ports.discard(port)
