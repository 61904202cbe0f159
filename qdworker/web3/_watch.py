"""watchChain: follow the primary chain's event logs and hand them to the chain filters.

Each run (cron ``*/3 * * * * *``, tag ``cron:watchChain``, retried after 10 s on failure):

1. read the head block; the last block it may process is ``head - WEB3_CONFIRMATIONS``;
2. on the first run ever, pin the start (``QDWORKER_WEB3_START_BLOCK``, else that block);
3. process ranges of at most :data:`MAX_BLOCK_RANGE` blocks, each in one transaction (see
   :mod:`.tx`): lock progress (``chain_last_processed_block_<chain>`` in ``qdworker_settings``),
   fetch every filter's logs, call the filters, store the range's last block, commit, then
   send the notifications the filters queued;
4. stop when caught up, or start no new range after :data:`RUN_BUDGET_SECONDS` (the next run
   continues).

An RPC failure or a filter exception rolls back the range in progress and fails the run:
ranges committed before it stay done, nothing of the failed one is kept. The result is
``{"chain", "head", "safeHead", "lastProcessedBlock", "ranges": [[from, to], …],
"logs": {filter: count}, "skipped", "caughtUp"}`` (``skipped``: logs that did not decode).
The run owns one database connection and one RPC session, both closed however it ends.
"""

from __future__ import annotations

import time
from typing import Any

from eth_typing import ChecksumAddress
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.types import FilterParams

from .._db import statements
from .._db.connection import Connection
from .._registry import Context, job
from . import _config as config
from ._aio import trio_as_aio
from ._client import check_chain_id, open_web3, rpc
from ._config import Chain
from ._filters import ChainFilter, ChainLog, registered_filters, to_chain_log
from ._tx import ChainTransaction, open_range_connection

#: Most blocks fetched and processed in one range (one transaction), as QuickDapp.
MAX_BLOCK_RANGE = 500
#: A run starts no new range after this many seconds; the next run continues.
RUN_BUDGET_SECONDS = 30.0
#: A run that takes longer is cancelled (its open range rolled back).
WATCH_TIMEOUT_SECONDS = 300.0
#: Settings key prefix, as QuickDapp: ``chain_last_processed_block_<chain>``.
PROGRESS_KEY_PREFIX = "chain_last_processed_block"


def progress_key(chain: str) -> str:
    return f"{PROGRESS_KEY_PREFIX}_{chain}"


def _aio(fn: Any) -> Any:
    return trio_as_aio(fn)


class _Fetcher:
    """Fetches and decodes one filter's logs; decoders are built once per run."""

    def __init__(self, w3: AsyncWeb3[AsyncHTTPProvider], chain: Chain, ctx: Context) -> None:
        self.w3 = w3
        self.chain = chain
        self.ctx = ctx
        self.skipped = 0
        self._events: dict[str, Any] = {}

    def _event(self, flt: ChainFilter) -> Any:
        if flt.name not in self._events:
            contract = self.w3.eth.contract(abi=[dict(flt.event_abi)])
            self._events[flt.name] = contract.events[flt.event_name]()
        return self._events[flt.name]

    async def logs(self, flt: ChainFilter, lo: int, hi: int) -> list[ChainLog]:
        params: FilterParams = {"fromBlock": lo, "toBlock": hi, "topics": [flt.topic]}
        if flt.address is not None:
            params["address"] = ChecksumAddress(flt.address)  # type: ignore[arg-type]
        raw = await rpc(
            self.chain, f"eth_getLogs {lo}-{hi} for {flt.name}", self.w3.eth.get_logs(params)
        )
        event = self._event(flt)
        decoded: list[ChainLog] = []
        for entry in raw:
            try:
                decoded.append(to_chain_log(flt.event_name, event.process_log(entry)))
            except Exception as exc:
                self.skipped += 1
                self.ctx.log.warning(
                    "%s: skipping a log that does not decode as %s (block %s, tx %s): %s",
                    flt.name,
                    flt.event_name,
                    entry.get("blockNumber"),
                    entry.get("transactionHash", b"").hex(),
                    exc,
                )
        return decoded


async def _process_range(
    ctx: Context,
    conn: Connection,
    fetcher: _Fetcher,
    filters: tuple[ChainFilter, ...],
    safe_head: int,
) -> tuple[int, int, dict[str, int]] | None:
    """Process the next range; return ``(from, to, logs per filter)``, or None if caught up."""
    chain = fetcher.chain
    key = progress_key(chain.name)
    rows = await _aio(conn.execute)(statements.get("web3_progress_lock"), {"key": key})
    last = int(rows[0]["value"])
    lo = last + 1
    if lo > safe_head:
        await _aio(conn.run)(lambda raw: raw.rollback())
        return None
    hi = min(lo + MAX_BLOCK_RANGE - 1, safe_head)
    fetched = [(flt, await fetcher.logs(flt, lo, hi)) for flt in filters]
    tx = ChainTransaction(conn, chain.name, lo, hi)
    for flt, logs in fetched:
        if logs:
            ctx.log.debug("%s: %d logs in blocks %d-%d", flt.name, len(logs), lo, hi)
            await flt.function(ctx, logs, tx)
    await _aio(conn.execute)(statements.get("web3_progress_set"), {"key": key, "value": str(hi)})
    for user_id, message in await tx.commit():
        try:
            await ctx.notify_user(user_id, message)
        except Exception:
            ctx.log.exception("could not send a notification to user %d", user_id)
    return lo, hi, {flt.name: len(logs) for flt, logs in fetched}


@job("watchChain", timeout=WATCH_TIMEOUT_SECONDS, runtime="asyncio")
async def watch_chain(ctx: Context) -> dict[str, Any]:
    cfg = config.current()
    chain = cfg.primary
    filters = registered_filters()
    started = time.monotonic()
    async with open_web3(chain) as w3:
        await check_chain_id(w3, chain)
        head = int(await rpc(chain, "eth_blockNumber", w3.eth.block_number))
        safe_head = head - cfg.confirmations
        fetcher = _Fetcher(w3, chain, ctx)
        ranges: list[list[int]] = []
        per_filter = {flt.name: 0 for flt in filters}
        caught_up = False
        conn = await open_range_connection(ctx.db.url)
        try:
            if safe_head >= 0 or cfg.start_block is not None:
                start = cfg.start_block if cfg.start_block is not None else safe_head
                await _aio(conn.execute)(
                    statements.get("web3_progress_pin"),
                    {"key": progress_key(chain.name), "value": str(start - 1)},
                )
                await _aio(conn.run)(lambda raw: raw.commit())
            while safe_head >= 0:
                done = await _process_range(ctx, conn, fetcher, filters, safe_head)
                if done is None:
                    caught_up = True
                    break
                ranges.append([done[0], done[1]])
                for name, n in done[2].items():
                    per_filter[name] += n
                if time.monotonic() - started > RUN_BUDGET_SECONDS:
                    break
            last = await _aio(conn.execute)(
                statements.get("web3_progress_get"), {"key": progress_key(chain.name)}
            )
            await _aio(conn.run)(lambda raw: raw.rollback())  # end the read's transaction
        finally:
            await _aio(conn.aclose)()
    last_block = int(last[0]["value"]) if last else None
    if ranges:
        ctx.log.info(
            "chain %s: processed blocks %d-%d (%d ranges, %d logs)",
            chain.name,
            ranges[0][0],
            ranges[-1][1],
            len(ranges),
            sum(per_filter.values()),
        )
    return {
        "chain": chain.name,
        "head": head,
        "safeHead": safe_head,
        "lastProcessedBlock": last_block,
        "ranges": ranges,
        "logs": per_filter,
        "skipped": fetcher.skipped,
        "caughtUp": caught_up,
    }
