"""Smoke tests: web3.py's AsyncWeb3 inside trio (via trio-asyncio) against a real anvil.

Covers: deploying the example factory from examples/web3/artifacts.json, creating
a token, transfers, eth_getLogs over block ranges with event decoding, the
Multicall3 pre-signed deployment, an RPC outage (stop/restart anvil on the same
port with --state), plus timings printed with ``-s``.
"""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import pytest
import trio

pytest.importorskip("web3")
trio_asyncio = pytest.importorskip("trio_asyncio")

import aiohttp  # noqa: E402
from anvil import DEFAULT_ACCOUNTS, Anvil, load_artifacts  # noqa: E402
from trio_asyncio import aio_as_trio  # noqa: E402
from web3 import AsyncHTTPProvider, AsyncWeb3  # noqa: E402
from web3.logs import DISCARD  # noqa: E402

pytestmark = pytest.mark.trio

# shared/ sits beside the checkout (locally and in CI).
SHARED = Path(os.environ.get("QDWORKER_SHARED", Path(__file__).resolve().parents[3] / "shared"))
MULTICALL3_JSON = SHARED / "web3" / "multicall3.json"
MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11"
N_EVENTS = int(os.environ.get("QDWORKER_WEB3_BENCH_EVENTS", "1000"))

OWNER, ALICE, BOB = DEFAULT_ACCOUNTS


def report(msg: str) -> None:
    print(f"[web3-bench] {msg}")


@pytest.fixture(scope="session")
def anvil_node():
    node = Anvil()
    secs = node.start()
    report(f"anvil start (to first eth_chainId answer): {secs * 1000:.0f} ms")
    try:
        yield node
    finally:
        node.close()


@asynccontextmanager
async def trio_web3(url: str, *, retries: bool = False):
    """AsyncWeb3 usable from trio: open a trio-asyncio loop and build the client in it.

    Pitfalls handled here:
    * web3's HTTPSessionManager guards its aiohttp session cache with
      ``loop.run_in_executor(ThreadPoolExecutor, lock.acquire)``; trio-asyncio only
      accepts ``TrioExecutor`` (AssertionError otherwise), so swap the pool.
    * web3 retries connection errors (5x, exponential backoff) for allow-listed
      methods by default; a job runner wants errors fast, so off unless asked.
    * the cached aiohttp session must be closed (``provider.disconnect()``) while
      the asyncio loop is still open.
    """
    async with trio_asyncio.open_loop():
        kwargs = {} if retries else {"exception_retry_configuration": None}
        provider = AsyncHTTPProvider(url, **kwargs)
        provider._request_session_manager.session_pool = trio_asyncio.TrioExecutor(max_workers=1)
        w3 = AsyncWeb3(provider)
        try:
            yield w3
        finally:
            with trio.CancelScope(shield=True):
                await aio_as_trio(provider.disconnect)()


async def deploy(w3: AsyncWeb3, name: str, *args, sender: str = OWNER):
    art = load_artifacts()[name]
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    tx_hash = await aio_as_trio(factory.constructor(*args).transact)({"from": sender})
    receipt = await aio_as_trio(w3.eth.wait_for_transaction_receipt)(tx_hash, timeout=10)
    assert receipt["status"] == 1
    return w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"]), receipt


async def transact(w3: AsyncWeb3, fn, tx: dict | None = None):
    tx_hash = await aio_as_trio(fn.transact)({"from": OWNER, **(tx or {})})
    receipt = await aio_as_trio(w3.eth.wait_for_transaction_receipt)(tx_hash, timeout=10)
    assert receipt["status"] == 1
    return receipt


async def create_token(w3, factory, name="Test Token", symbol="TST", decimals=18, supply=10**24):
    receipt = await transact(w3, factory.functions.createToken(name, symbol, decimals, supply))
    # DISCARD: the receipt also holds the new token's mint Transfer log
    (ev,) = factory.events.ERC20NewToken().process_receipt(receipt, errors=DISCARD)
    token = w3.eth.contract(address=ev["args"]["token"], abi=load_artifacts()["SimpleToken"]["abi"])
    return token, receipt


async def test_chain_basics(anvil_node):
    async with trio_web3(anvil_node.url) as w3:
        assert await aio_as_trio(w3.is_connected)()
        # properties return coroutines: wrap the awaitable itself
        assert await aio_as_trio(w3.eth.chain_id) == 31337
        accounts = await aio_as_trio(w3.eth.accounts)
        assert accounts[0] == OWNER
        assert await aio_as_trio(w3.eth.get_balance)(OWNER) > 0
        # trio cancellation reaches into the asyncio side
        with trio.move_on_after(5):
            assert await aio_as_trio(w3.eth.get_block_number)() >= 0


async def test_factory_token_transfer_logs(anvil_node):
    async with trio_web3(anvil_node.url) as w3:
        start_block = await aio_as_trio(w3.eth.get_block_number)()
        factory, _ = await deploy(w3, "TokenFactory")
        token, create_receipt = await create_token(w3, factory, "Quick Token", "QTK", 6, 1_000_000)
        assert await aio_as_trio(token.functions.symbol().call)() == "QTK"
        assert await aio_as_trio(token.functions.balanceOf(OWNER).call)() == 1_000_000

        await transact(w3, token.functions.transfer(ALICE, 250))
        await transact(w3, token.functions.transfer(BOB, 5))
        end_block = await aio_as_trio(w3.eth.get_block_number)()

        # Raw eth_getLogs over a block range, filtered by event topic, then decoded.
        sig = "ERC20NewToken(address,string,string,address,uint256)"
        new_token_topic = "0x" + w3.keccak(text=sig).hex().removeprefix("0x")
        raw = await aio_as_trio(w3.eth.get_logs)(
            {"fromBlock": start_block + 1, "toBlock": end_block, "topics": [new_token_topic]}
        )
        created = [factory.events.ERC20NewToken().process_log(log) for log in raw]
        assert len(created) == 1
        args = created[0]["args"]
        assert args["token"] == token.address and args["creator"] == OWNER
        assert (args["name"], args["symbol"], args["initialSupply"]) == (
            "Quick Token",
            "QTK",
            10**6,
        )
        assert created[0]["blockNumber"] == create_receipt["blockNumber"]

        # Contract-event helper: same eth_getLogs, address + topic filled in.
        transferred = await aio_as_trio(token.events.TokenTransferred().get_logs)(
            from_block=start_block + 1, to_block=end_block
        )
        got = [(e["args"]["to"], e["args"]["value"]) for e in transferred]
        assert got == [(ALICE, 250), (BOB, 5)]
        for e in transferred:
            a = e["args"]
            assert (a["from"], a["name"], a["symbol"], a["decimals"]) == (
                OWNER,
                "Quick Token",
                "QTK",
                6,
            )
        # The standard ERC-20 Transfer is emitted too (mint + 2 transfers).
        std = await aio_as_trio(token.events.Transfer().get_logs)(
            from_block=start_block + 1, to_block=end_block
        )
        assert len(std) == 3


async def test_multicall3_presigned_deployment(anvil_node):
    if not MULTICALL3_JSON.exists():
        pytest.skip(f"{MULTICALL3_JSON} not found")
    mc = json.loads(MULTICALL3_JSON.read_text())
    async with trio_web3(anvil_node.url) as w3:
        code = await aio_as_trio(w3.eth.get_code)(MULTICALL3_ADDRESS)
        if len(code) == 0:
            sender = AsyncWeb3.to_checksum_address(mc["sender"])
            value = AsyncWeb3.to_wei(Decimal(mc["eth"]), "ether")
            fund_tx = {"from": OWNER, "to": sender, "value": value}
            fund = await aio_as_trio(w3.eth.send_transaction)(fund_tx)
            await aio_as_trio(w3.eth.wait_for_transaction_receipt)(fund, timeout=10)
            # Pre-EIP-155 (v=27/28) tx: anvil accepts it on any --chain-id, no extra flag.
            tx_hash = await aio_as_trio(w3.eth.send_raw_transaction)(mc["signedDeploymentTx"])
            receipt = await aio_as_trio(w3.eth.wait_for_transaction_receipt)(tx_hash, timeout=10)
            assert receipt["status"] == 1
            assert receipt["contractAddress"] == MULTICALL3_ADDRESS
        code = await aio_as_trio(w3.eth.get_code)(MULTICALL3_ADDRESS)
        assert len(code) > 1000
        # Multicall3.getChainId() -> selector 0x3408e470
        out = await aio_as_trio(w3.eth.call)({"to": MULTICALL3_ADDRESS, "data": "0x3408e470"})
        assert int.from_bytes(out, "big") == 31337


async def test_rpc_outage_restart_same_port(tmp_path):
    node = Anvil(state_path=tmp_path / "anvil-state.json")
    await trio.to_thread.run_sync(node.start)
    try:
        async with trio_web3(node.url) as w3:
            factory, _ = await deploy(w3, "TokenFactory")
            token, _ = await create_token(w3, factory)
            before = await aio_as_trio(w3.eth.get_block_number)()

            await trio.to_thread.run_sync(node.stop)  # outage
            with pytest.raises(aiohttp.ClientConnectorError):
                with trio.fail_after(5):
                    await aio_as_trio(w3.eth.get_block_number)()

            port = node.port
            await trio.to_thread.run_sync(node.start)  # same port, state reloaded
            assert node.port == port
            # the same client/session recovers without being rebuilt
            assert await aio_as_trio(w3.eth.get_block_number)() == before
            assert len(await aio_as_trio(w3.eth.get_code)(token.address)) > 0
            assert await aio_as_trio(factory.functions.numTokens().call)() == 1
            await transact(w3, token.functions.transfer(ALICE, 1))
            assert await aio_as_trio(w3.eth.get_block_number)() == before + 1
    finally:
        await trio.to_thread.run_sync(node.close)
