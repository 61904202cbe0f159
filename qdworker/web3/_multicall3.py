"""deployMulticall3: make sure Multicall3 exists at its canonical address on the primary chain.

Submitted at supervisor start (tag ``deploy-multicall3``). If code exists at the address the
run succeeds with ``{"deployed": false, …}``. Otherwise it tops the public deployer address
up to the ETH the pre-signed transaction needs (from the server wallet), submits that public
pre-signed deployment transaction, waits for its receipt and checks the code, returning
``{"deployed": true, "transactionHash": …}``. Anything else fails the run with a reason
(retried per the job's settings): a node error, a reverted transaction, a deployer whose
nonce is no longer 0 (the pre-signed transaction can never be mined then), missing code.

The sender, amount and signed transaction are public data from ``multicall3.json`` (see
github.com/mds1/multicall). The server wallet's private key is used to sign one transfer and
is never logged or put in a result. The run owns one RPC session, closed when it ends.
"""

from __future__ import annotations

import functools
import json
from decimal import Decimal
from importlib import resources
from typing import Any

from eth_account import Account
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.types import TxParams

from .._registry import Context, job
from . import _config as config
from ._client import check_chain_id, open_web3, rpc
from ._config import Chain

#: A run that takes longer is cancelled.
DEPLOY_TIMEOUT_SECONDS = 300.0
#: Longest wait for one transaction's receipt.
RECEIPT_TIMEOUT_SECONDS = 120.0
#: Receipt polling interval.
RECEIPT_POLL_SECONDS = 0.1
#: Gas of a plain ETH transfer.
TRANSFER_GAS = 21_000


class Multicall3Info:
    """The public deployment data: contract and deployer addresses, ETH needed, signed tx."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.contract = AsyncWeb3.to_checksum_address(data["contract"])
        self.sender = AsyncWeb3.to_checksum_address(data["sender"])
        self.wei = int(AsyncWeb3.to_wei(Decimal(str(data["eth"])), "ether"))
        self.signed_tx = HexBytes(data["signedDeploymentTx"])


@functools.cache
def info() -> Multicall3Info:
    """The data in the package's ``multicall3.json``."""
    text = (
        resources.files(__package__ or "qdworker.web3")
        .joinpath("multicall3.json")
        .read_text("utf-8")
    )
    return Multicall3Info(json.loads(text))


async def _send(
    w3: AsyncWeb3[AsyncHTTPProvider], chain: Chain, raw: bytes, what: str
) -> tuple[HexBytes, Any]:
    """Send the signed transaction ``raw`` and wait for its receipt; return its hash and the
    receipt. Node failures raise :class:`ChainRpcError`; a reverted transaction raises
    :class:`RuntimeError` naming ``what`` and the hash."""
    tx_hash = await rpc(chain, f"sending the {what} transaction", w3.eth.send_raw_transaction(raw))
    receipt = await rpc(
        chain,
        f"waiting for the {what} receipt",
        w3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=RECEIPT_TIMEOUT_SECONDS, poll_latency=RECEIPT_POLL_SECONDS
        ),
    )
    if receipt["status"] != 1:
        raise RuntimeError(f"the {what} transaction {tx_hash.to_0x_hex()} reverted")
    return tx_hash, receipt


async def _fund_deployer(
    ctx: Context, w3: AsyncWeb3[AsyncHTTPProvider], chain: Chain, mc: Multicall3Info
) -> str | None:
    """Send the deployer what it lacks; return the funding transaction hash (None if none)."""
    balance = int(await rpc(chain, "eth_getBalance", w3.eth.get_balance(mc.sender)))
    if balance >= mc.wei:
        return None
    wallet = Account.from_key(config.current().server_wallet_private_key)
    payer = ChecksumAddress(wallet.address)
    tx: TxParams = {
        "to": mc.sender,
        "value": mc.wei - balance,  # type: ignore[typeddict-item]
        "gas": TRANSFER_GAS,
        "gasPrice": await rpc(chain, "eth_gasPrice", w3.eth.gas_price),
        "nonce": await rpc(
            chain, "eth_getTransactionCount", w3.eth.get_transaction_count(payer, "pending")
        ),
        "chainId": await rpc(chain, "eth_chainId", w3.eth.chain_id),
    }
    signed = wallet.sign_transaction(tx)
    tx_hash, _ = await _send(w3, chain, signed.raw_transaction, "Multicall3 deployer funding")
    ctx.log.info(
        "funded the Multicall3 deployer %s with %d wei from %s", mc.sender, mc.wei - balance, payer
    )
    return str(tx_hash.to_0x_hex())


@job("deployMulticall3", timeout=DEPLOY_TIMEOUT_SECONDS, runtime="asyncio")
async def deploy_multicall3(ctx: Context) -> dict[str, Any]:
    chain = config.current().primary
    mc = info()
    async with open_web3(chain) as w3:
        await check_chain_id(w3, chain)
        code = await rpc(chain, "eth_getCode", w3.eth.get_code(mc.contract))
        if len(code) > 0:
            ctx.log.info("Multicall3 is already deployed at %s on %s", mc.contract, chain.name)
            return {
                "deployed": False,
                "alreadyDeployed": True,
                "address": mc.contract,
                "chain": chain.name,
            }
        nonce = await rpc(chain, "eth_getTransactionCount", w3.eth.get_transaction_count(mc.sender))
        if nonce != 0:
            raise RuntimeError(
                f"Multicall3 is not at {mc.contract} on {chain.name}, but its deployer {mc.sender} "
                f"has nonce {nonce}: the pre-signed transaction can never be mined there"
            )
        funding = await _fund_deployer(ctx, w3, chain, mc)
        tx_hash, receipt = await _send(w3, chain, mc.signed_tx, "Multicall3 deployment")
        code = await rpc(chain, "eth_getCode", w3.eth.get_code(mc.contract))
        if len(code) == 0:
            raise RuntimeError(
                f"the Multicall3 deployment {tx_hash.to_0x_hex()} was mined "
                f"but {mc.contract} has no code"
            )
    ctx.log.info(
        "deployed Multicall3 at %s on %s (tx %s)", mc.contract, chain.name, tx_hash.to_0x_hex()
    )
    return {
        "deployed": True,
        "address": mc.contract,
        "chain": chain.name,
        "transactionHash": tx_hash.to_0x_hex(),
        "fundingTransactionHash": funding,
        "blockNumber": int(receipt["blockNumber"]),
    }
