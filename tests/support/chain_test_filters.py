"""Chain filters used by the web3 tests (imported by worker processes via QDWORKER_JOBS).

``recordTransfers`` writes every TokenTransferred log's id into ``test_chain_logs`` (primary
key: a log processed twice would fail the run) through the range's transaction. With
``QDWORKER_TEST_BLOCK_KEY`` set, it then waits on that advisory lock inside the transaction,
so a test can hold a run mid-range (after the filter's writes, before progress is stored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qdworker.web3 import ChainLog, ChainTransaction, chain_filter

ARTIFACTS = Path(__file__).resolve().parents[2] / "examples" / "web3" / "artifacts.json"
_ABI = json.loads(ARTIFACTS.read_text())["contracts"]["SimpleToken"]["abi"]
TOKEN_TRANSFERRED = next(e for e in _ABI if e.get("name") == "TokenTransferred")


@chain_filter("recordTransfers", event=TOKEN_TRANSFERRED)
async def record_transfers(ctx: Any, logs: list[ChainLog], tx: ChainTransaction) -> None:
    for log in logs:
        await tx.execute(
            "INSERT INTO test_chain_logs (log_id, block_number, range_from, range_to)"
            " VALUES (%s, %s, %s, %s)",
            (log.id, log.block_number, tx.from_block, tx.to_block),
        )
    block_key = os.environ.get("QDWORKER_TEST_BLOCK_KEY")
    if block_key:
        await tx.execute("SELECT pg_advisory_xact_lock(%s)", (int(block_key),))
