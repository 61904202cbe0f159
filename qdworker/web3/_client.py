"""web3.py's ``AsyncWeb3`` inside a trio worker (asyncio code run through trio-asyncio).

Use from ``runtime="asyncio"`` handlers only::

    async with open_web3(chain) as w3:
        head = await w3.eth.block_number

:func:`open_web3` owns the provider's aiohttp session and closes it on exit, error or
cancellation. Two trio-asyncio pitfalls are handled: web3 guards its session cache with
``loop.run_in_executor(ThreadPoolExecutor, …)``, which trio-asyncio refuses (only its
``TrioExecutor`` is accepted), and web3's built-in retries are off (a failed call fails the
run at once; the job's retry policy decides what happens next). Every request is bounded by
:data:`RPC_TIMEOUT_SECONDS`.

Failures of the node surface as :class:`ChainRpcError`, whose message names the chain and the
call but never the RPC URL's path or query (they often hold API keys).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import aiohttp
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import Web3Exception

from .._logs import module_logger
from ._aio import trio_executor
from ._config import Chain

logger = module_logger(__name__)

T = TypeVar("T")

#: Longest a single JSON-RPC request may take.
RPC_TIMEOUT_SECONDS = 15.0

_verified_chain_ids: set[tuple[str, str]] = set()

# web3 logs "Successfully disconnected" at INFO for every session closed: once per run here.
logging.getLogger("web3.providers.AsyncHTTPProvider").setLevel(logging.WARNING)


class ChainRpcError(Exception):
    """A JSON-RPC call failed (node down, timeout, error reply). Fails the job's run."""


def _describe(chain: Chain, exc: BaseException) -> str:
    text = str(exc).replace(chain.rpc_url, chain.rpc_display) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


async def rpc(chain: Chain, what: str, call: Awaitable[T]) -> T:
    """Await ``call`` (one RPC request); turn node failures into :class:`ChainRpcError`."""
    try:
        return await call
    except (TimeoutError, aiohttp.ClientError, OSError, Web3Exception, ValueError) as exc:
        raise ChainRpcError(
            f"chain {chain.name} ({chain.rpc_display}): {what} failed: {_describe(chain, exc)}"
        ) from None


@asynccontextmanager
async def open_web3(chain: Chain) -> AsyncIterator[AsyncWeb3[AsyncHTTPProvider]]:
    """An ``AsyncWeb3`` on ``chain``'s RPC URL for the duration of the block (asyncio code)."""
    provider = AsyncHTTPProvider(
        chain.rpc_url,
        request_kwargs={"timeout": aiohttp.ClientTimeout(total=RPC_TIMEOUT_SECONDS)},
        exception_retry_configuration=None,
    )
    # trio-asyncio accepts only its own executor for run_in_executor.
    provider._request_session_manager.session_pool = trio_executor(max_workers=1)
    w3 = AsyncWeb3(provider)
    try:
        yield w3
    finally:
        try:
            await provider.disconnect()
        except Exception:
            logger.debug("closing the web3 session failed", exc_info=True)


async def check_chain_id(w3: AsyncWeb3[AsyncHTTPProvider], chain: Chain) -> None:
    """Raise :class:`ChainRpcError` if the node's chain id is not the one ``chain`` names.

    Checked once per process and URL; chains without a known id are not checked.
    """
    if chain.chain_id is None or (chain.name, chain.rpc_url) in _verified_chain_ids:
        return
    got = await rpc(chain, "eth_chainId", w3.eth.chain_id)
    if got != chain.chain_id:
        raise ChainRpcError(
            f"chain {chain.name} ({chain.rpc_display}): the node reports chain id {got}, "
            f"expected {chain.chain_id}"
        )
    _verified_chain_ids.add((chain.name, chain.rpc_url))
