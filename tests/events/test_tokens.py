from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from qdworker._events.tokens import (
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    TOKEN_MALFORMED,
    Identity,
    mint,
    verify,
)
from qdworker.errors import TokenError

SECRET = "test-secret-that-is-long-enough-for-hs256-and-even-for-hs512-tokens!!"


def _quickdapp_token(**overrides: object) -> str:
    """A token shaped exactly like QuickDapp's AuthService.generateToken."""
    now = time.time()
    claims: dict[str, object] = {
        "type": "auth",
        "userId": 42,
        "iat": int(now),
        "iatMs": int(now * 1000),
        "jti": f"{int(now * 1000)}-abc123def",
        "exp": int(now) + 24 * 3600,
    }
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET, algorithm="HS256")


def _code(secret: str, token: object) -> str:
    with pytest.raises(TokenError) as info:
        verify(secret, token)  # type: ignore[arg-type]
    return info.value.code


def test_round_trip() -> None:
    assert verify(SECRET, mint(SECRET, 7, 60)) == Identity(user_id=7, admin=False)
    admin = Identity(user_id=7, admin=True, viewer=True)
    assert verify(SECRET, mint(SECRET, 7, 60, admin=True)) == admin
    viewer = Identity(user_id=7, viewer=True)
    assert verify(SECRET, mint(SECRET, 7, 60, viewer=True)) == viewer


def test_minted_claims_match_quickdapp() -> None:
    claims = jwt.decode(mint(SECRET, 9, 60), SECRET, algorithms=["HS256"])
    assert claims["type"] == "auth"
    assert claims["userId"] == 9
    assert {"iat", "iatMs", "jti", "exp"} <= set(claims)
    assert "role" not in claims


def test_accepts_quickdapp_token() -> None:
    assert verify(SECRET, _quickdapp_token()) == Identity(user_id=42)


def test_expired() -> None:
    assert _code(SECRET, mint(SECRET, 7, -60)) == TOKEN_EXPIRED


def test_forged_signature() -> None:
    assert _code(SECRET, mint("another-secret-of-sufficient-length-xyz", 7, 60)) == TOKEN_INVALID
    header, payload, sig = mint(SECRET, 7, 60).split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["userId"] = 1
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    assert _code(SECRET, f"{header}.{forged}.{sig}") == TOKEN_INVALID


def test_wrong_algorithm_and_none() -> None:
    hs512 = jwt.encode({"type": "auth", "userId": 1, "exp": time.time() + 60}, SECRET, "HS512")
    assert _code(SECRET, hs512) == TOKEN_INVALID
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(b'{"type":"auth","userId":1,"exp":9999999999}')
    unsigned = f"{none_header}.{payload.rstrip(b'=').decode()}."
    assert _code(SECRET, unsigned) == TOKEN_INVALID


@pytest.mark.parametrize(
    "overrides",
    [
        {"type": "refresh"},
        {"type": None},
        {"userId": None},
        {"userId": "42"},
        {"userId": 0},
        {"userId": -3},
        {"userId": True},
        {"exp": None},
    ],
)
def test_bad_claims(overrides: dict[str, object]) -> None:
    assert _code(SECRET, _quickdapp_token(**overrides)) == TOKEN_INVALID


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "not a jwt at all", "x" * 10_000, None, 12])
def test_malformed(token: object) -> None:
    assert _code(SECRET, token) == TOKEN_MALFORMED


def test_role_other_than_admin_or_viewer_is_plain_user() -> None:
    assert verify(SECRET, _quickdapp_token(role="superuser")) == Identity(user_id=42)
    admin = Identity(user_id=42, admin=True, viewer=True)
    assert verify(SECRET, _quickdapp_token(role="admin")) == admin
    assert verify(SECRET, _quickdapp_token(role="viewer")) == Identity(user_id=42, viewer=True)


def test_error_never_contains_token() -> None:
    token = mint("another-secret-of-sufficient-length-xyz", 7, 60)
    with pytest.raises(TokenError) as info:
        verify(SECRET, token)
    assert token not in str(info.value)
    assert token.split(".")[1] not in repr(info.value)


def test_mint_validates_arguments() -> None:
    with pytest.raises(ValueError):
        mint("", 1, 60)
    with pytest.raises(ValueError):
        mint(SECRET, 0, 60)
    with pytest.raises(ValueError):
        mint(SECRET, 1, float("inf"))
    with pytest.raises(ValueError):
        verify("", "a.b.c")
