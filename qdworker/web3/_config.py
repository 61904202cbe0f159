"""The web3 settings: QuickDapp's environment variable names, read only when the web3 part loads.

=====================================  ==========================================================
``WEB3_SUPPORTED_CHAINS``              comma-separated chain names; the first is the one watched
                                       and deployed to (required)
``WEB3_<CHAIN>_RPC``                   HTTP(S) JSON-RPC URL of each listed chain, e.g.
                                       ``WEB3_ANVIL_RPC``, ``WEB3_SEPOLIA_RPC`` (required)
``WEB3_SERVER_WALLET_PRIVATE_KEY``     0x + 64 hex digits; pays deployMulticall3 (required,
                                       never logged nor shown by ``repr``)
``WEB3_FACTORY_CONTRACT_ADDRESS``      0x + 40 hex digits; for filters that want it (optional)
``WEB3_CONFIRMATIONS``                 blocks a block must be buried under before watchChain
                                       processes it (integer >= 0, default 0 as QuickDapp)
``QDWORKER_WEB3_START_BLOCK``          block watchChain starts at on its first run (integer
                                       >= 0; default: the current block, as QuickDapp)
=====================================  ==========================================================

Known chain names carry their chain id (``anvil`` 31337, ``mainnet``/``ethereum`` 1,
``sepolia`` 11155111, ``base`` 8453); the jobs check the node's ``eth_chainId`` against it once
per process. Other names (lower-case letters, digits, ``_``) are accepted without that check.

:func:`load` raises :class:`~qdworker.errors.ConfigError` with one line naming the variable and
what it accepts, for the first bad or missing value. Nothing here reads ``os.environ`` except
:func:`load` with no argument, called by :func:`current` when the web3 part is imported.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import ConfigError

#: Chain ids of the chain names QuickDapp knows.
KNOWN_CHAIN_IDS: Mapping[str, int] = {
    "anvil": 31337,
    "mainnet": 1,
    "ethereum": 1,
    "sepolia": 11155111,
    "base": 8453,
}

_CHAIN_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_PRIVATE_KEY_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")


def rpc_env(chain: str) -> str:
    """The variable holding ``chain``'s RPC URL: ``WEB3_<CHAIN>_RPC`` (QuickDapp's pattern)."""
    return f"WEB3_{chain.upper()}_RPC"


def redact_rpc_url(url: str) -> str:
    """``scheme://host:port/…``: RPC URLs often carry an API key in the path or query."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    rest = "/…" if (parts.path not in ("", "/") or parts.query or parts.username) else ""
    return f"{parts.scheme}://{host}{port}{rest}"


@dataclass(frozen=True)
class Chain:
    """One supported chain: its name, RPC URL (hidden by ``repr``) and expected chain id."""

    name: str
    rpc_url: str = field(repr=False)
    chain_id: int | None

    @property
    def rpc_display(self) -> str:
        return redact_rpc_url(self.rpc_url)


@dataclass(frozen=True)
class Web3Config:
    """The web3 settings. ``repr()`` hides the private key and RPC URLs."""

    chains: tuple[Chain, ...]
    server_wallet_private_key: str = field(repr=False)
    factory_contract_address: str | None = None
    confirmations: int = 0
    start_block: int | None = None

    @property
    def primary(self) -> Chain:
        """The first supported chain: the one watched and deployed to."""
        return self.chains[0]


def _bad(env: str, raw: str, accepted: str, *, secret: bool = False) -> ConfigError:
    shown = "<hidden>" if secret else repr(raw)
    return ConfigError(f"{env}={shown} is invalid: expected {accepted}")


def _int_at_least(env: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise _bad(env, raw, f"an integer >= {minimum}")
    return value


def _chains(env: Mapping[str, str]) -> tuple[Chain, ...]:
    raw = env.get("WEB3_SUPPORTED_CHAINS", "")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    if not names:
        raise ConfigError(
            "WEB3_SUPPORTED_CHAINS is not set: expected chain names such as 'anvil,sepolia'"
        )
    chains: list[Chain] = []
    for name in names:
        if not _CHAIN_NAME_RE.match(name):
            raise _bad("WEB3_SUPPORTED_CHAINS", raw, "comma-separated names of a-z, 0-9 and _")
        var = rpc_env(name)
        url = env.get(var, "").strip()
        if not url:
            raise ConfigError(
                f"{var} is not set: chain {name!r} is in WEB3_SUPPORTED_CHAINS and needs an RPC URL"
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{var}={redact_rpc_url(url)!r} is invalid: expected an http:// or https:// URL"
            )
        chains.append(Chain(name, url, KNOWN_CHAIN_IDS.get(name)))
    return tuple(chains)


def load(environ: Mapping[str, str] | None = None) -> Web3Config:
    """Build a :class:`Web3Config` from ``environ`` (default ``os.environ``).

    Raises :class:`ConfigError` (one line, never showing the key or an RPC URL's path) on the
    first missing or invalid value.
    """
    env = os.environ if environ is None else environ
    chains = _chains(env)
    key = env.get("WEB3_SERVER_WALLET_PRIVATE_KEY", "").strip()
    if not key:
        raise ConfigError(
            "WEB3_SERVER_WALLET_PRIVATE_KEY is not set: deployMulticall3 pays from this wallet"
        )
    if not _PRIVATE_KEY_RE.match(key):
        raise _bad(
            "WEB3_SERVER_WALLET_PRIVATE_KEY", key, "0x followed by 64 hex digits", secret=True
        )
    factory = env.get("WEB3_FACTORY_CONTRACT_ADDRESS", "").strip() or None
    if factory is not None and not _ADDRESS_RE.match(factory):
        raise _bad("WEB3_FACTORY_CONTRACT_ADDRESS", factory, "0x followed by 40 hex digits")
    confirmations = 0
    if env.get("WEB3_CONFIRMATIONS", "").strip():
        confirmations = _int_at_least("WEB3_CONFIRMATIONS", env["WEB3_CONFIRMATIONS"], 0)
    start_block = None
    if env.get("QDWORKER_WEB3_START_BLOCK", "").strip():
        start_block = _int_at_least(
            "QDWORKER_WEB3_START_BLOCK", env["QDWORKER_WEB3_START_BLOCK"], 0
        )
    return Web3Config(chains, key, factory, confirmations, start_block)


@functools.cache
def current() -> Web3Config:
    """The process's settings, read from ``os.environ`` once. Raises :class:`ConfigError`."""
    return load()
