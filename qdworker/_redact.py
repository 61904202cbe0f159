"""Hiding secrets in text that may be logged or shown: :func:`redact`."""

from __future__ import annotations

import re

_PASSWORD_RE = re.compile(r"(://[^:/@]*:)[^@]*@|(password\s*=\s*)\S+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every password of a libpq URL (``scheme://user:secret@``) or connection
    string (``password=secret``) replaced by ``***``. Never raises."""
    return _PASSWORD_RE.sub(
        lambda m: (m.group(1) or m.group(2)) + "***" + ("@" if m.group(1) else ""), text
    )
