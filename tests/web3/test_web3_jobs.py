"""watchChain and deployMulticall3 against a real anvil node and real worker processes.

Synchronisation is by outcomes in the database (bounded waits), never by sleeping. Timings
for the closing note are printed with ``-s`` (``[web3-bench]`` lines).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import trio
from anvil import Anvil
from procs import all_finished, env_for, running, start_worker, wait_for
from psycopg.rows import dict_row
from web3_chain import (
    ALICE,
    BOB,
    OWNER,
    Chain,
    connect_chain,
    prepare_app_db,
    web3_env,
)

from qdworker._db import statements

MULTICALL3 = "0xcA11bde05977b3631167028862bE2a173976CA11"
PROGRESS_KEY = "chain_last_processed_block_anvil"
BENCH_EVENTS = int(os.environ.get("QDWORKER_WEB3_BENCH_EVENTS", "1000"))
BLOCK_KEY = 4242


def report(msg: str) -> None:
    print(f"[web3-bench] {msg}")


def sql(db_url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def submit_watch(db_url: str, tag: str = "cron:watchChain") -> int:
    """One run of watchChain now (a one-shot row; the cron chain is tested separately)."""
    rows = sql(
        db_url, "INSERT INTO worker_jobs (tag, type) VALUES (%s, 'watchChain') RETURNING id", (tag,)
    )
    return int(rows[0]["id"])


def finished(db_url: str, job_id: int, timeout: float = 30) -> dict[str, Any]:
    return wait_for(
        db_url,
        "SELECT * FROM worker_jobs WHERE id = %s",
        all_finished,
        timeout=timeout,
        params=(job_id,),
    )[0]


def run_watch(db_url: str, timeout: float = 30) -> dict[str, Any]:
    return finished(db_url, submit_watch(db_url), timeout)


def progress(db_url: str) -> int | None:
    rows = sql(db_url, "SELECT value FROM qdworker_settings WHERE key = %s", (PROGRESS_KEY,))
    return int(rows[0]["value"]) if rows else None


def logged(db_url: str) -> list[dict[str, Any]]:
    return sql(db_url, "SELECT * FROM test_chain_logs ORDER BY block_number, log_id")


def transfers(chain: Chain, token: Any, n: int, to: str = ALICE, sender: str = OWNER) -> int:
    """``n`` transfers, one block each; returns the last block."""
    for _ in range(n):
        receipt = chain.transact(token.functions.transfer(to, 1), sender)
    return int(receipt["blockNumber"])


@pytest.fixture
def worker(db_url: str) -> Iterator[Any]:
    """Start workers with ``worker(**env)``; all are killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> subprocess.Popen[bytes]:
        proc = start_worker(db_url, **env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        with running(proc):
            pass


@pytest.fixture(scope="module")
def web3_pkg(chain: Chain) -> Iterator[Any]:
    """``qdworker.web3`` imported in this process, configured for the shared chain."""
    saved = dict(os.environ)
    os.environ.update(
        {
            k: v
            for k, v in web3_env(chain.node.url, chain.factory.address).items()
            if k.startswith("WEB3_")
        }
    )
    import qdworker.web3

    yield qdworker.web3
    os.environ.clear()
    os.environ.update(saved)


# --- deployMulticall3 --------------------------------------------------------------------


def test_deploy_multicall3_on_fresh_chain_then_noop(db_url: str, worker: Any) -> None:
    node = Anvil()
    node.start()
    try:
        from web3 import HTTPProvider, Web3

        w3 = Web3(HTTPProvider(node.url))
        assert w3.eth.get_code(MULTICALL3) == b""
        worker(**web3_env(node.url))
        submit = statements.get("web3_submit_deploy_multicall3")
        params = {"retry_delay_ms": 1000, "max_attempts": 2}
        first = finished(db_url, sql(db_url, submit, params)[0]["id"])
        assert first["success"], first["result"]
        assert first["result"]["deployed"] is True
        assert first["result"]["address"] == MULTICALL3
        assert len(w3.eth.get_code(MULTICALL3)) > 1000
        # Multicall3.getChainId() answers: the contract works
        out = w3.eth.call({"to": MULTICALL3, "data": "0x3408e470"})  # type: ignore[typeddict-item]
        assert int.from_bytes(out, "big") == 31337
        head = w3.eth.block_number

        second = finished(db_url, sql(db_url, submit, params)[0]["id"])
        assert second["success"], second["result"]
        assert second["result"] == {
            "deployed": False,
            "alreadyDeployed": True,
            "address": MULTICALL3,
            "chain": "anvil",
        }
        assert w3.eth.block_number == head  # nothing sent the second time
    finally:
        node.close()


# --- start-up: cron job, submission, configuration ---------------------------------------


def test_ensure_web3_jobs(db_url: str, web3_pkg: Any) -> None:
    from qdworker._db.connection import connect
    from qdworker._supervisor.startup import ensure_cron_jobs

    async def ensure_twice() -> None:  # what the module declares, as supervisors ensure it
        conn = await connect(db_url)
        try:
            for _ in range(2):
                await ensure_cron_jobs(conn, [web3_pkg.WATCH_CHAIN], "UTC")
                await web3_pkg._startup.submit_deploy_multicall3(conn, "UTC")
        finally:
            await conn.aclose()

    trio.run(ensure_twice)
    rows = sql(db_url, "SELECT * FROM worker_jobs WHERE finished IS NULL ORDER BY id")
    assert [(r["type"], r["tag"]) for r in rows] == [
        ("watchChain", "cron:watchChain"),
        ("deployMulticall3", "deploy-multicall3"),
    ]
    cron = rows[0]
    assert cron["cron_schedule"] == "*/3 * * * * *"
    assert cron["auto_reschedule_on_failure"] and cron["auto_reschedule_on_failure_delay"] == 10_000
    assert rows[1]["data"] == {"forceRedeploy": False}


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"WEB3_CONFIRMATIONS": "-1"},
            "WEB3_CONFIRMATIONS='-1' is invalid: expected an integer >= 0",
        ),
        ({"WEB3_ANVIL_RPC": ""}, "WEB3_ANVIL_RPC is not set"),
        (
            {"WEB3_SERVER_WALLET_PRIVATE_KEY": "0x1234"},
            "WEB3_SERVER_WALLET_PRIVATE_KEY=<hidden> is invalid",
        ),
    ],
)
def test_bad_settings_stop_worker_start(db_url: str, env: dict[str, str], line: str) -> None:
    settings = {**web3_env("http://127.0.0.1:9"), **env}
    proc = subprocess.run(
        [sys.executable, "-m", "qdworker._worker"],
        env=env_for(db_url, **settings),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert line in proc.stderr
    assert "0x1234" not in proc.stderr


# --- watchChain ----------------------------------------------------------------------------


def test_watch_chain_cron_notifies_token_created_and_transfers(
    db_url: str, chain: Chain, worker: Any, web3_pkg: Any
) -> None:
    prepare_app_db(db_url, {OWNER: 1, ALICE: 2})
    start = chain.head() + 1
    worker(**web3_env(chain.node.url, chain.factory.address, start_block=start))
    from qdworker._db.connection import connect
    from qdworker._supervisor.startup import ensure_cron_jobs

    async def ensure() -> None:  # the cron job exactly as the supervisor ensures it
        conn = await connect(db_url)
        try:
            await ensure_cron_jobs(conn, [web3_pkg.WATCH_CHAIN], "UTC")
        finally:
            await conn.aclose()

    trio.run(ensure)
    token, created = chain.create_token("Quick Token", "QTK", 6, 1_000_000)
    sent = chain.transact(token.functions.transfer(ALICE, 2_500_000 // 10))
    chain.transact(token.functions.transfer(BOB, 5), ALICE)
    last = int(chain.transact(token.functions.transfer(OWNER, 1), BOB)["blockNumber"])  # unknown

    wait_for(
        db_url,
        "SELECT value FROM qdworker_settings WHERE key = %s",
        lambda rows: bool(rows) and int(rows[0]["value"]) >= last,
        params=(PROGRESS_KEY,),
    )
    notes = sql(db_url, "SELECT * FROM app_notifications ORDER BY id")
    by_user = sorted((n["user_id"], n["data"]["type"]) for n in notes)
    assert by_user == [(1, "token_created"), (1, "token_transfer"), (2, "token_transfer")]
    data = {(n["user_id"], n["data"]["type"]): n["data"] for n in notes}
    token_lc = token.address.lower()
    assert data[(1, "token_created")] == {
        "type": "token_created",
        "message": f"Created new token QTK (Quick Token) at {token.address}",
        "transactionHash": created["transactionHash"].to_0x_hex(),
        "tokenAddress": token_lc,
        "creator": OWNER,
        "initialSupply": "1000000",
        "tokenSymbol": "QTK",
        "tokenName": "Quick Token",
    }
    assert data[(1, "token_transfer")] == {
        "type": "token_transfer",
        "message": f"Sent 0.25 QTK (Quick Token) to {ALICE}",
        "transactionHash": sent["transactionHash"].to_0x_hex(),
        "tokenAddress": token_lc,
        "from": OWNER,
        "to": ALICE,
        "amount": "250000",
        "tokenSymbol": "QTK",
        "tokenName": "Quick Token",
    }
    assert data[(2, "token_transfer")]["from"] == ALICE
    assert len(logged(db_url)) == 3  # every transfer, known sender or not
    # the run that saved that progress is finished just after its last range commits
    runs = wait_for(db_url, "SELECT success FROM worker_jobs WHERE type = 'watchChain' AND finished IS NOT NULL",
                    bool)  # fmt: skip
    assert all(r["success"] for r in runs)


def test_sigkill_mid_range_neither_loses_nor_repeats_a_log(
    db_url: str, chain: Chain, worker: Any
) -> None:
    prepare_app_db(db_url)
    token, _ = chain.create_token()
    start = chain.head() + 1
    last = transfers(chain, token, 20)
    env = web3_env(
        chain.node.url, chain.factory.address, start_block=start, QDWORKER_LEASE_SECONDS="1.5"
    )
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (BLOCK_KEY,))
        first = worker(**env, QDWORKER_TEST_BLOCK_KEY=str(BLOCK_KEY))
        job_id = submit_watch(db_url)
        # The filter has written all 20 rows in the range's transaction and now waits.
        wait_for(
            db_url,
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND NOT granted",
            bool,
            params=(BLOCK_KEY,),
        )
        assert logged(db_url) == [] and progress(db_url) == start - 1  # nothing visible yet
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    worker(**env)  # the run's lease expires; this worker runs it again
    row = finished(db_url, job_id)
    assert row["success"], row["result"]
    assert row["lost_runs"] == 1
    assert progress(db_url) == last
    ids = [r["log_id"] for r in logged(db_url)]
    assert len(ids) == 20 == len(set(ids))


def test_rpc_outage_fails_run_saves_nothing_then_catches_up(
    db_url: str, worker: Any, tmp_path: Any
) -> None:
    prepare_app_db(db_url)
    node = Anvil(state_path=tmp_path / "state.json")
    node.start()
    try:
        chain = connect_chain(node)
        token, _ = chain.create_token()
        start = chain.head() + 1
        done = transfers(chain, token, 3)
        worker(**web3_env(node.url, chain.factory.address, start_block=start))
        assert run_watch(db_url)["success"]
        assert progress(db_url) == done and len(logged(db_url)) == 3

        last = transfers(chain, token, 3)
        node.stop()  # outage
        failed = run_watch(db_url)
        assert failed["success"] is False
        assert failed["result"]["error_type"] == "ChainRpcError"
        assert "anvil" in failed["result"]["error"]
        assert progress(db_url) == done and len(logged(db_url)) == 3

        node.start()  # same port, same chain (state reloaded)
        assert chain.head() == last
        ok = run_watch(db_url)
        assert ok["success"], ok["result"]
        assert ok["result"]["ranges"] == [[done + 1, last]]
        assert progress(db_url) == last
        ids = [r["log_id"] for r in logged(db_url)]
        assert len(ids) == 6 == len(set(ids))
    finally:
        node.close()


def test_range_over_500_blocks_is_split_and_runs_never_overlap(
    db_url: str, chain: Chain, worker: Any
) -> None:
    prepare_app_db(db_url)
    token, _ = chain.create_token()
    s = transfers(chain, token, 1)
    chain.mine(499)
    assert transfers(chain, token, 1) == s + 500  # first block of the second range
    chain.mine(600)
    last = transfers(chain, token, 1)
    assert last == s + 1101
    worker(**web3_env(chain.node.url, chain.factory.address, start_block=s))
    # Two runs at once: the progress row lock serialises them; each range is done once.
    a, b = submit_watch(db_url, "split-a"), submit_watch(db_url, "split-b")
    runs = [finished(db_url, a), finished(db_url, b)]
    assert all(r["success"] for r in runs), [r["result"] for r in runs]
    ranges = sorted(rng for r in runs for rng in r["result"]["ranges"])
    assert ranges == [[s, s + 499], [s + 500, s + 999], [s + 1000, last]]
    got = [(r["block_number"], r["range_from"], r["range_to"]) for r in logged(db_url)]
    assert got == [(s, s, s + 499), (s + 500, s + 500, s + 999), (last, s + 1000, last)]
    assert progress(db_url) == last


def test_confirmations_hold_back_recent_blocks(db_url: str, chain: Chain, worker: Any) -> None:
    prepare_app_db(db_url)
    token, _ = chain.create_token()
    start = chain.head() + 1
    last = transfers(chain, token, 3)
    worker(
        **web3_env(chain.node.url, chain.factory.address, start_block=start, WEB3_CONFIRMATIONS="2")
    )
    row = run_watch(db_url)
    assert row["result"]["safeHead"] == last - 2 and progress(db_url) == last - 2
    assert len(logged(db_url)) == 1
    chain.mine(2)
    run_watch(db_url)
    assert progress(db_url) == last and len(logged(db_url)) == 3


def test_watch_chain_processes_1000_events_in_two_ranges(
    db_url: str, chain: Chain, worker: Any
) -> None:
    """Blocks/s and events/s of one watchChain run over BENCH_EVENTS transfers, one per block,
    with both example filters and the recording filter writing (sender known: every transfer
    becomes a notification row)."""
    prepare_app_db(db_url, {OWNER: 1})
    token, _ = chain.create_token("Bench", "BNCH", 18, 10**30)
    start = chain.head() + 1
    t0 = time.perf_counter()
    for i in range(BENCH_EVENTS):
        tx_hash = token.functions.transfer((ALICE, BOB)[i % 2], 1).transact(
            {"from": OWNER, "gas": 200_000}
        )
    last = int(chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)["blockNumber"])
    report(f"{BENCH_EVENTS} transfers sent (1 per block): {time.perf_counter() - t0:.2f} s")
    assert last - start + 1 == BENCH_EVENTS
    worker(**web3_env(chain.node.url, chain.factory.address, start_block=start))
    row = run_watch(db_url, timeout=60)
    assert row["success"], row["result"]
    seconds = (row["finished"] - row["started"]).total_seconds()
    blocks = last - start + 1
    assert len(logged(db_url)) == BENCH_EVENTS
    notes = sql(db_url, "SELECT count(*) AS n FROM app_notifications")[0]["n"]
    assert notes == BENCH_EVENTS
    report(
        f"watchChain: {blocks} blocks, {BENCH_EVENTS} events, {len(row['result']['ranges'])} "
        f"ranges in {seconds:.2f} s: {blocks / seconds:.0f} blocks/s, "
        f"{BENCH_EVENTS / seconds:.0f} events/s"
    )
