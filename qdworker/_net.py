"""Host names of the servers qdworker binds (websocket, HTTP): one notion of "loopback"."""

from __future__ import annotations

import ipaddress


def normalize_host(host: str) -> str:
    """``host`` as a bind address: trimmed, without the brackets of an IPv6 literal
    (``[::1]`` -> ``::1``)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def is_loopback(host: str) -> bool:
    """True for ``localhost`` (any case) and loopback addresses (``127.0.0.1``, ``::1``,
    ``[::1]`` …); False for everything else, including names that merely resolve there."""
    host = normalize_host(host)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
