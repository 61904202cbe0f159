"""Chain filters: what watchChain hands each block range's event logs to.

An app registers filters like job types, in a module named by ``QDWORKER_JOBS``::

    @chain_filter("sendToken", event=TOKEN_TRANSFERRED_ABI)          # any contract
    async def send_token(ctx, logs, tx):
        for log in logs:                                             # list[ChainLog]
            await tx.execute("INSERT …", {...})                       # same transaction as progress
            tx.notify_user(user_id, {...})                           # sent after commit

The function is asyncio code (watchChain runs with ``runtime="asyncio"``): ``ctx`` is the job's
:class:`qdworker.Context` (asyncio coroutines), ``logs`` the range's decoded logs in chain
order (only called when there is at least one), ``tx`` a
:class:`~qdworker.web3._tx.ChainTransaction` bound to the transaction that also stores the
range's progress. An exception from the function rolls the whole range back and fails the run
(it is retried, so the range is processed again); to skip one bad entry, catch around
``async with tx.savepoint():``. A log that cannot be decoded with the filter's ABI is logged
and skipped. Registering a second, different function under a taken name raises
:class:`~qdworker.errors.JobTypeError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from eth_utils.abi import event_abi_to_log_topic
from eth_utils.address import is_address, to_checksum_address
from hexbytes import HexBytes

from ..errors import JobTypeError

if TYPE_CHECKING:
    from .._registry import Context
    from ._tx import ChainTransaction

FilterFunction = Callable[["Context", "list[ChainLog]", "ChainTransaction"], Awaitable[None]]
F = TypeVar("F", bound=FilterFunction)

_filters: dict[str, ChainFilter] = {}


@dataclass(frozen=True)
class ChainLog:
    """One decoded event log. ``args`` holds the event's inputs (addresses checksummed)."""

    event: str
    args: Mapping[str, Any]
    address: str
    block_number: int
    block_hash: str
    transaction_hash: str
    log_index: int

    @property
    def id(self) -> str:
        """``<transaction hash>:<log index>``: unique per log on a chain."""
        return f"{self.transaction_hash}:{self.log_index}"


@dataclass(frozen=True)
class ChainFilter:
    """A registered filter: its name, event ABI, optional contract address and function."""

    name: str
    event_abi: Mapping[str, Any]
    address: str | None
    function: FilterFunction

    @property
    def event_name(self) -> str:
        return str(self.event_abi["name"])

    @property
    def topic(self) -> str:
        """The event's topic 0 (keccak of its signature), 0x-prefixed."""
        return "0x" + event_abi_to_log_topic(dict(self.event_abi)).hex()  # type: ignore[arg-type]

    @property
    def where(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"


def _check_event_abi(name: str, abi: Mapping[str, Any]) -> None:
    if not isinstance(abi, Mapping) or abi.get("type") != "event" or not abi.get("name"):
        raise JobTypeError(
            f"chain filter {name!r}: event must be an event ABI entry (type 'event')"
        )
    if abi.get("anonymous"):
        raise JobTypeError(f"chain filter {name!r}: anonymous events have no topic to filter on")
    try:
        event_abi_to_log_topic(dict(abi))  # type: ignore[arg-type]
    except Exception as exc:
        raise JobTypeError(f"chain filter {name!r}: bad event ABI: {exc}") from None


def chain_filter(
    name: str, *, event: Mapping[str, Any], address: str | None = None
) -> Callable[[F], F]:
    """Register the decorated ``async def fn(ctx, logs, tx)`` as chain filter ``name``."""
    if not isinstance(name, str) or not name.strip():
        raise JobTypeError("chain filter name must be a non-empty string")
    _check_event_abi(name, event)
    if address is not None and not is_address(address):
        raise JobTypeError(f"chain filter {name!r}: address {address!r} is not a 0x address")
    checksummed = to_checksum_address(address) if address is not None else None

    def register(fn: F) -> F:
        new = ChainFilter(name, dict(event), checksummed, fn)
        old = _filters.get(name)
        if old is not None and old.where != new.where:
            raise JobTypeError(
                f"chain filter {name!r} is registered twice: by {old.where} and by {new.where}"
            )
        _filters[name] = new
        return fn

    return register


def registered_filters() -> tuple[ChainFilter, ...]:
    """The registered filters, in registration order."""
    return tuple(_filters.values())


def _hex(value: Any) -> str:
    return HexBytes(value).to_0x_hex()


def to_chain_log(event: str, decoded: Mapping[str, Any]) -> ChainLog:
    """A :class:`ChainLog` from web3's decoded ``EventData``."""
    return ChainLog(
        event=event,
        args=dict(decoded["args"]),
        address=to_checksum_address(decoded["address"]),
        block_number=int(decoded["blockNumber"]),
        block_hash=_hex(decoded["blockHash"]),
        transaction_hash=_hex(decoded["transactionHash"]),
        log_index=int(decoded["logIndex"]),
    )
