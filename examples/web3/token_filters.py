"""Example chain filters: QuickDapp's ``sendToken`` and ``createToken``, for qdworker.web3.

Load with ``QDWORKER_JOBS=qdworker.web3,token_filters`` (this folder on ``PYTHONPATH``) after
applying ``schema.sql``. For each ``TokenTransferred`` log (any token contract) the sender,
and for each ``ERC20NewToken`` log (the factory at ``WEB3_FACTORY_CONTRACT_ADDRESS``) the
creator, is looked up in ``app_user_wallets``; a known user gets a row in
``app_notifications`` and, once the block range commits, a websocket message
``{"type": "notification_received", "data": {"id", "userId", "data", "createdAt", "read"}}``
whose ``data`` has QuickDapp's fields (``token_transfer`` / ``token_created``).

Everything is written through ``tx`` (the range's transaction), so a notification row exists
exactly once per log even if the worker dies mid-range. One entry that fails is logged and
skipped (its savepoint is rolled back); the others are kept.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from qdworker.errors import ConfigError
from qdworker.web3 import ChainLog, ChainTransaction, chain_filter, current

ARTIFACTS = Path(__file__).resolve().parent / "artifacts.json"
TOKEN_TRANSFER = "token_transfer"
TOKEN_CREATED = "token_created"
NOTIFICATION_RECEIVED = "notification_received"

FIND_USER = "SELECT user_id FROM app_user_wallets WHERE wallet = %(wallet)s"
ADD_NOTIFICATION = """
INSERT INTO app_notifications (user_id, data) VALUES (%(user_id)s, %(data)s::jsonb)
RETURNING id, created_at
"""


def _event_abi(contract: str, event: str) -> dict[str, Any]:
    abi = json.loads(ARTIFACTS.read_text())["contracts"][contract]["abi"]
    return next(e for e in abi if e.get("type") == "event" and e["name"] == event)


def _factory_address() -> str:
    address = current().factory_contract_address
    if address is None:
        raise ConfigError(
            "WEB3_FACTORY_CONTRACT_ADDRESS is not set: the createToken filter needs it"
        )
    return address


async def _notify(tx: ChainTransaction, wallet: str, data: dict[str, Any]) -> int | None:
    """Store and queue a notification for the wallet's user; None if the wallet is unknown."""
    rows = await tx.execute(FIND_USER, {"wallet": wallet.lower()})
    if not rows:
        return None
    user_id = int(rows[0]["user_id"])
    row = (await tx.execute(ADD_NOTIFICATION, {"user_id": user_id, "data": json.dumps(data)}))[0]
    tx.notify_user(
        user_id,
        {
            "type": NOTIFICATION_RECEIVED,
            "data": {
                "id": row["id"],
                "userId": user_id,
                "data": data,
                "createdAt": row["created_at"].isoformat(),
                "read": False,
            },
        },
    )
    return user_id


async def _notify_or_skip(
    ctx: Any, tx: ChainTransaction, name: str, log: ChainLog, wallet: str, data: dict[str, Any]
) -> None:
    """Notify the wallet's user; one bad log entry is rolled back to its savepoint and skipped."""
    try:
        async with tx.savepoint():
            user_id = await _notify(tx, wallet, data)
    except Exception:
        ctx.log.exception("%s: skipping log %s", name, log.id)
        return
    if user_id is None:
        ctx.log.debug("%s: no user for wallet %s", name, wallet)


@chain_filter("sendToken", event=_event_abi("SimpleToken", "TokenTransferred"))
async def send_token(ctx: Any, logs: list[ChainLog], tx: ChainTransaction) -> None:
    for log in logs:
        a = log.args
        amount = Decimal(a["value"]) / (Decimal(10) ** int(a["decimals"]))
        data = {
            "type": TOKEN_TRANSFER,
            "message": f"Sent {amount:.2f} {a['symbol']} ({a['name']}) to {a['to']}",
            "transactionHash": log.transaction_hash,
            "tokenAddress": log.address.lower(),
            "from": a["from"],
            "to": a["to"],
            "amount": str(a["value"]),
            "tokenSymbol": a["symbol"],
            "tokenName": a["name"],
        }
        await _notify_or_skip(ctx, tx, "sendToken", log, a["from"], data)


@chain_filter(
    "createToken", event=_event_abi("TokenFactory", "ERC20NewToken"), address=_factory_address()
)
async def create_token(ctx: Any, logs: list[ChainLog], tx: ChainTransaction) -> None:
    for log in logs:
        a = log.args
        data = {
            "type": TOKEN_CREATED,
            "message": f"Created new token {a['symbol']} ({a['name']}) at {a['token']}",
            "transactionHash": log.transaction_hash,
            "tokenAddress": a["token"].lower(),
            "creator": a["creator"],
            "initialSupply": str(a["initialSupply"]),
            "tokenSymbol": a["symbol"],
            "tokenName": a["name"],
        }
        await _notify_or_skip(ctx, tx, "createToken", log, a["creator"], data)
