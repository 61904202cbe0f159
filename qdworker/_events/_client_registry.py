"""Who is connected to the hub: clients indexed by user and by admin role.

:class:`ClientRegistry` keeps the sets the hub routes by: every client (broadcasts), admin
clients (everything), non-admin clients per user id (that user's notifications and job events),
and the number of identified clients per user id, admins included (the per-user connection
cap). Identities are set and changed only through the registry so that the indexes always agree
with :attr:`HubClient.identity`. Nothing here raises; the registry owns only its sets and dicts
(empty entries are deleted). Not thread-safe: used from the trio thread of the websocket server.
"""

from __future__ import annotations

from ._client_queue import HubClient
from .tokens import Identity


class ClientRegistry:
    """The hub's indexes of connected clients (read directly by the hub's fan-out)."""

    __slots__ = ("admins", "by_user", "clients", "user_counts")

    def __init__(self) -> None:
        self.clients: set[HubClient] = set()
        self.admins: set[HubClient] = set()
        self.by_user: dict[int, set[HubClient]] = {}  # non-admin identified clients
        self.user_counts: dict[int, int] = {}  # all identified clients, for caps

    def add(self, client: HubClient, identity: Identity | None) -> None:
        """Register ``client`` as ``identity`` (``None``: anonymous)."""
        self.clients.add(client)
        self._index(client, identity)

    def remove(self, client: HubClient) -> None:
        """Forget ``client`` (its identity is reset to ``None``)."""
        self._unindex(client)
        self.clients.discard(client)

    def set_identity(self, client: HubClient, identity: Identity | None) -> None:
        """Move ``client`` to the indexes of ``identity``."""
        self._unindex(client)
        self._index(client, identity)

    def user_client_count(self, user_id: int) -> int:
        """Connected clients identified as ``user_id`` (admins included)."""
        return self.user_counts.get(user_id, 0)

    def identified_count(self) -> int:
        """Connected clients with an identity (user or admin)."""
        return sum(self.user_counts.values())

    def _index(self, client: HubClient, identity: Identity | None) -> None:
        client.identity = identity
        if identity is None:
            return
        self.user_counts[identity.user_id] = self.user_counts.get(identity.user_id, 0) + 1
        if identity.admin:
            self.admins.add(client)
        else:
            self.by_user.setdefault(identity.user_id, set()).add(client)

    def _unindex(self, client: HubClient) -> None:
        identity = client.identity
        if identity is None:
            return
        remaining = self.user_counts.get(identity.user_id, 0) - 1
        if remaining > 0:
            self.user_counts[identity.user_id] = remaining
        else:
            self.user_counts.pop(identity.user_id, None)
        if identity.admin:
            self.admins.discard(client)
        else:
            users = self.by_user.get(identity.user_id)
            if users is not None:
                users.discard(client)
                if not users:
                    del self.by_user[identity.user_id]
        client.identity = None
