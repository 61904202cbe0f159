"""The web3 tests' chain: anvil's accounts, the example TokenFactory deployed on it, worker
settings for the web3 part, and the example app's schema."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from anvil import DEFAULT_ACCOUNTS, Anvil, load_artifacts
from web3 import HTTPProvider, Web3
from web3.contract import Contract
from web3.logs import DISCARD

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parents[1]
EXAMPLES = ROOT / "examples" / "web3"

OWNER, ALICE, BOB = DEFAULT_ACCOUNTS
#: anvil's first dev account's well-known key (the server wallet in tests).
OWNER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
GAS = 15_000_000

TEST_TABLES = """
CREATE TABLE test_chain_logs (
    log_id text PRIMARY KEY, block_number bigint NOT NULL,
    range_from bigint NOT NULL, range_to bigint NOT NULL
);
"""


@dataclass
class Chain:
    node: Anvil
    w3: Web3
    factory: Contract

    def head(self) -> int:
        return int(self.w3.eth.block_number)

    def transact(self, fn: Any, sender: str = OWNER) -> Any:
        tx_hash = fn.transact({"from": sender, "gas": GAS})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10)
        assert receipt["status"] == 1
        return receipt

    def create_token(
        self,
        name: str = "Test Token",
        symbol: str = "TST",
        decimals: int = 18,
        supply: int = 10**24,
        sender: str = OWNER,
    ) -> tuple[Contract, Any]:
        receipt = self.transact(
            self.factory.functions.createToken(name, symbol, decimals, supply), sender
        )
        (event,) = self.factory.events.ERC20NewToken().process_receipt(receipt, errors=DISCARD)
        token = self.w3.eth.contract(
            address=event["args"]["token"], abi=load_artifacts()["SimpleToken"]["abi"]
        )
        return token, receipt

    def mine(self, blocks: int) -> None:
        self.w3.provider.make_request("anvil_mine", [hex(blocks)])  # type: ignore[arg-type]


def connect_chain(node: Anvil) -> Chain:
    w3 = Web3(HTTPProvider(node.url, request_kwargs={"timeout": 10}))
    art = load_artifacts()["TokenFactory"]
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    receipt = w3.eth.wait_for_transaction_receipt(
        factory.constructor().transact({"from": OWNER, "gas": GAS}), timeout=10
    )
    return Chain(node, w3, w3.eth.contract(address=receipt["contractAddress"], abi=art["abi"]))


def web3_env(
    rpc_url: str, factory: str | None = None, start_block: int | None = None, **extra: str
) -> dict[str, str]:
    """Worker settings: the web3 part (plus, with a factory, the example and test filters)."""
    jobs = "qdworker.web3,token_filters,chain_test_filters" if factory else "qdworker.web3"
    env = {
        "QDWORKER_JOBS": jobs,
        "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(ROOT), str(EXAMPLES)]),
        "WEB3_SUPPORTED_CHAINS": "anvil",
        "WEB3_ANVIL_RPC": rpc_url,
        "WEB3_SERVER_WALLET_PRIVATE_KEY": OWNER_KEY,
        "QDWORKER_POLL_INTERVAL": "0.5",
        "WORKER_LOG_LEVEL": "info",
    }
    if factory:
        env["WEB3_FACTORY_CONTRACT_ADDRESS"] = factory
    if start_block is not None:
        env["QDWORKER_WEB3_START_BLOCK"] = str(start_block)
    env.update(extra)
    return env


def prepare_app_db(db_url: str, wallets: dict[str, int] | None = None) -> None:
    """Apply the example app's schema and the test tables; map wallets to user ids."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute((EXAMPLES / "schema.sql").read_text())
        conn.execute(TEST_TABLES)
        for wallet, user_id in (wallets or {}).items():
            conn.execute(
                "INSERT INTO app_user_wallets (wallet, user_id) VALUES (%s, %s)",
                (wallet.lower(), user_id),
            )
