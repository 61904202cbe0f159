"""watchChain end to end: two supervisors with the web3 part, a real anvil, and a websocket
client of user 1 on one of them receiving QuickDapp's token notifications for logs that may
have been processed on either supervisor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from trio_websocket import open_websocket_url
from web3_chain import ALICE, BOB, OWNER, Chain, prepare_app_db, web3_env

from qdworker import Config, Manager, serve
from qdworker._events.tokens import mint

SECRET = "web3-websocket-test-secret-0123456789"


async def test_token_notifications_reach_the_right_user(
    db_url: str, chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_app_db(db_url, {OWNER: 1, ALICE: 2})  # Bob is not a user
    env = web3_env(chain.node.url, chain.factory.address, start_block=chain.head() + 1)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    jobs = tuple(env["QDWORKER_JOBS"].split(","))
    config = Config(http_port=0,
        database_url=db_url, worker_count=1, ws_port=0, ws_secret=SECRET, jobs=jobs,
        data_dir=tmp_path, poll_interval=0.5, worker_log_level="warn",
    )  # fmt: skip
    got: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    async with trio.open_nursery() as nursery:
        first: Manager = await nursery.start(serve, config)
        second: Manager = await nursery.start(serve, config)
        url = f"ws://127.0.0.1:{second.ws_port}/ws"
        headers = {
            uid: [(b"Authorization", f"Bearer {mint(SECRET, uid, 600)}".encode())] for uid in got
        }
        async with (
            open_websocket_url(url, extra_headers=headers[1]) as one,
            open_websocket_url(url, extra_headers=headers[2]) as two,
        ):
            for ws in (one, two):
                while json.loads(await ws.get_message())["type"] != "registered":
                    pass
            token, _ = await trio.to_thread.run_sync(
                chain.create_token, "Quick Token", "QTK", 6, 10**12
            )
            await trio.to_thread.run_sync(chain.transact, token.functions.transfer(ALICE, 250_000))
            await trio.to_thread.run_sync(
                chain.transact, token.functions.transfer(BOB, 1_000), ALICE
            )

            async def collect(uid: int, ws: Any, until: str) -> None:
                while True:
                    msg = json.loads(await ws.get_message())
                    if msg["type"] == "notification_received":
                        got[uid].append(msg["data"])
                    if msg["type"] == until:
                        return

            async def expect(uid: int, ws: Any, count: int) -> None:
                while len(got[uid]) < count:
                    msg = json.loads(await ws.get_message())
                    if msg["type"] == "notification_received":
                        got[uid].append(msg["data"])

            with trio.fail_after(60):
                # Processed on either supervisor: one relayed from the other may arrive after
                # anything sent later on this one, so wait for each, then end with a broadcast
                # that shows nothing more came.
                await expect(2, two, 1)  # Alice's send
                await expect(1, one, 2)  # the token's creation, the transfer to Alice
                with psycopg.connect(db_url, autocommit=True) as conn:
                    conn.execute("""SELECT qdworker_broadcast('{"type": "end", "data": {}}')""")
                await collect(1, one, "end")
                await collect(2, two, "end")
        await first.shutdown()
        await second.shutdown()
    kinds = [n["data"]["type"] for n in got[1]]
    assert sorted(kinds) == ["token_created", "token_transfer"]
    transfer = next(n for n in got[1] if n["data"]["type"] == "token_transfer")
    assert transfer["userId"] == 1 and transfer["read"] is False
    assert transfer["data"]["from"] == OWNER and transfer["data"]["to"] == ALICE
    assert transfer["data"]["amount"] == "250000" and transfer["data"]["tokenSymbol"] == "QTK"
    # each user got only their own: user 1 the creation and its send, user 2 its own send
    assert [n["data"]["type"] for n in got[2]] == ["token_transfer"]
    assert got[2][0]["userId"] == 2 and got[2][0]["data"]["from"] == ALICE
