"""What the websocket server says to clients: close codes, error codes and message texts.

Every server message is one compact JSON text ``{"type": ..., "data": ...}``; the protocol is
documented in ``docs/websocket.md``. The close and error codes are re-exported by
:mod:`qdworker._events.websocket`, their public home. Token error codes come from
:mod:`qdworker._events.tokens`. Nothing here raises (the data passed in is always JSON-safe) or
owns resources.
"""

from __future__ import annotations

import json
from typing import Any, Final

from .tokens import Identity

# Close codes (see docs/websocket.md).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_UNAUTHORIZED: Final = 4001
CLOSE_PING_TIMEOUT: Final = 4002
CLOSE_CLIENT_TOO_SLOW: Final = 4008
CLOSE_CONNECTION_LIMIT: Final = 4029

# Error codes carried in {"type": "error", "data": {"code": ...}}; token codes
# come from qdworker._events.tokens.
CONNECTION_LIMIT_TOTAL_EXCEEDED: Final = "CONNECTION_LIMIT_TOTAL_EXCEEDED"
CONNECTION_LIMIT_PER_USER_EXCEEDED: Final = "CONNECTION_LIMIT_PER_USER_EXCEEDED"
INVALID_MESSAGE: Final = "INVALID_MESSAGE"

_SEPARATORS: Final = (",", ":")


def text(msg_type: str, data: Any) -> str:
    """The JSON text of a server message of type ``msg_type``."""
    return json.dumps({"type": msg_type, "data": data}, separators=_SEPARATORS)


def error_text(code: str, message: str) -> str:
    """The JSON text of an ``error`` message."""
    return text("error", {"code": code, "message": message})


CONNECTED_TEXT: Final = text("connected", {"message": "WebSocket connection established"})
INVALID_MESSAGE_TEXT: Final = error_text(
    INVALID_MESSAGE, "Expected a JSON object with type 'register' or 'subscribe'"
)


def registered_text(identity: Identity | None, *, dev_mode: bool) -> str:
    """The ``registered`` reply; in development mode the user id is not shown."""
    if identity is None:
        return text(
            "registered",
            {"userId": None, "admin": False, "message": "Registered without a user"},
        )
    return text(
        "registered",
        {
            "userId": None if dev_mode else identity.user_id,
            "admin": identity.admin,
            "message": "Successfully registered with user ID",
        },
    )
