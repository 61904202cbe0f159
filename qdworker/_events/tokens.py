"""HS256 auth tokens compatible with QuickDapp's ``AuthService``.

QuickDapp signs tokens with ``SESSION_ENCRYPTION_KEY`` (UTF-8 bytes) using
HS256 and the claims ``{"type": "auth", "userId": <number>, "iat", "iatMs",
"jti", "exp"}`` (24 h expiry).  A QuickDapp app and qdworker configured with
the same secret therefore accept each other's tokens.  qdworker adds one
optional claim, ``"role"``: ``"admin"`` lets the holder see every user's messages and job
events and act on jobs in the dashboard, ``"viewer"`` lets the holder read the dashboard;
QuickDapp ignores it.

Verification rules (mirroring QuickDapp, plus a mandatory ``exp``):

* signature must be HS256 with the shared secret;
* ``exp`` must be present and in the future (``CLOCK_SKEW_LEEWAY_SECONDS``
  leeway); ``nbf`` is honoured if present; ``iat`` is not checked (QuickDapp
  does not check it either);
* ``type`` must be ``"auth"``;
* ``userId`` must be a positive integer.

Failures raise :class:`~qdworker.errors.TokenError` with ``code`` one of
:data:`TOKEN_EXPIRED`, :data:`TOKEN_INVALID`, :data:`TOKEN_MALFORMED`.
QuickDapp reports all of these as ``UNAUTHORIZED`` over GraphQL, with the
messages "Token expired" / "Invalid token"; the messages here match, the
codes are finer grained.  Token text is never logged nor included in error
messages.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

import jwt

from ..errors import ConfigError, TokenError

ALGORITHM: Final = "HS256"
TOKEN_TYPE: Final = "auth"
"""Value of the ``type`` claim QuickDapp puts in (and requires of) auth tokens."""
ADMIN_ROLE: Final = "admin"
VIEWER_ROLE: Final = "viewer"
CLOCK_SKEW_LEEWAY_SECONDS: Final = 5.0
MAX_TOKEN_CHARS: Final = 8 * 1024
"""Longer strings are rejected as malformed without being parsed."""

TOKEN_EXPIRED: Final = "TOKEN_EXPIRED"
"""The token was valid but its ``exp`` has passed.  Get a fresh token."""
TOKEN_INVALID: Final = "TOKEN_INVALID"
"""Well-formed JWT that fails verification: bad signature (forged or other
secret), wrong algorithm, missing ``exp``, wrong ``type``, bad ``userId``."""
TOKEN_MALFORMED: Final = "TOKEN_MALFORMED"
"""Not a decodable JWT at all (not a string, bad segments/base64/JSON, too long)."""


# TokenError lives in qdworker.errors (one exception tree); ``code`` is a ``TOKEN_*`` constant.


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token belongs to; ``admin`` sees every user's traffic and may act on
    jobs; ``viewer`` may read the dashboard (every admin may)."""

    user_id: int
    admin: bool = False
    viewer: bool = False


def mint(
    secret: str, user_id: int, ttl_seconds: float, admin: bool = False, *, viewer: bool = False
) -> str:
    """Create a QuickDapp-style auth token valid for ``ttl_seconds`` (with the ``admin``
    role, or else the ``viewer`` role when ``viewer`` is true).

    A negative ``ttl_seconds`` yields an already expired token (useful in
    tests).  Raises :class:`ValueError` for an empty secret, a non-positive or
    non-integer ``user_id``, or a non-finite ttl.
    """
    if not secret:
        raise ValueError("secret must not be empty")
    if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id <= 0:
        raise ValueError("user_id must be a positive integer")
    if not math.isfinite(ttl_seconds):
        raise ValueError("ttl_seconds must be finite")
    now = time.time()
    claims: dict[str, Any] = {
        "type": TOKEN_TYPE,
        "userId": user_id,
        "iat": int(now),
        "iatMs": int(now * 1000),
        "jti": f"{int(now * 1000)}-{secrets.token_hex(6)}",
        "exp": math.floor(now + ttl_seconds),
    }
    if admin:
        claims["role"] = ADMIN_ROLE
    elif viewer:
        claims["role"] = VIEWER_ROLE
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str) -> Identity:
    """Verify ``token`` against ``secret`` and return its :class:`Identity`.

    Raises :class:`TokenError` (see module docstring for the codes) and
    :class:`ValueError` if ``secret`` is empty.
    """
    if not secret:
        raise ValueError("secret must not be empty")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise TokenError(TOKEN_MALFORMED, "Malformed token")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp"], "verify_iat": False},
            leeway=CLOCK_SKEW_LEEWAY_SECONDS,
        )
    except jwt.ExpiredSignatureError:
        raise TokenError(TOKEN_EXPIRED, "Token expired") from None
    except jwt.InvalidSignatureError:  # subclass of DecodeError: test first
        raise TokenError(TOKEN_INVALID, "Invalid token") from None
    except jwt.InvalidAlgorithmError:
        raise TokenError(TOKEN_INVALID, "Invalid token") from None
    except jwt.DecodeError:
        raise TokenError(TOKEN_MALFORMED, "Malformed token") from None
    except jwt.InvalidTokenError:
        raise TokenError(TOKEN_INVALID, "Invalid token") from None
    if claims.get("type") != TOKEN_TYPE:
        raise TokenError(TOKEN_INVALID, "Invalid token type")
    user_id = claims.get("userId")
    if isinstance(user_id, float) and user_id.is_integer():
        user_id = int(user_id)
    if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id <= 0:
        raise TokenError(TOKEN_INVALID, "Invalid token payload")
    role = claims.get("role")
    admin = role == ADMIN_ROLE
    return Identity(user_id=user_id, admin=admin, viewer=admin or role == VIEWER_ROLE)


def ws_token(user_id: int, ttl_seconds: float = 3600, admin: bool = False) -> str:
    """Mint a websocket token with the configured ``QDWORKER_WS_SECRET``.

    Raises :class:`~qdworker.errors.ConfigError` when no secret is configured (development
    mode needs no token: every client is admin there).
    """
    from .. import _config as config_module

    secret = config_module.load().ws_secret
    if not secret:
        raise ConfigError("QDWORKER_WS_SECRET is not set: tokens need a secret to be signed with")
    return mint(secret, user_id, ttl_seconds, admin)
