from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from qdworker._events.hub import Hub, HubClient, Subscription
from qdworker._events.tokens import Identity

pytestmark = pytest.mark.trio


def event(job_id: int, user_id: int = 1, **extra: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "event": "succeeded",
        "id": job_id,
        "tag": f"tag-{job_id % 3}",
        "type": "email" if job_id % 2 else "sms",
        "user_id": user_id,
        "attempt": 1,
        "due": "2024-01-01T00:00:00+00:00",
        "started": "2024-01-01T00:00:01+00:00",
        "finished": "2024-01-01T00:00:02+00:00",
        "successor_id": None,
    }
    ev.update(extra)
    return ev


def drain(client: HubClient) -> list[Any]:
    """Take everything queued for a client without waiting."""
    out: list[Any] = []
    while client.queued:
        out.extend(json.loads(t) for t in client._queue)
        client._queue.clear()
    return out


async def test_job_event_conversion_and_routing() -> None:
    hub = Hub()
    alice = hub.add_client(Identity(1))
    bob = hub.add_client(Identity(2))
    admin = hub.add_client(Identity(99, admin=True))
    anon = hub.add_client(None)
    hub.publish_job_events(
        [event(10, user_id=1), event(11, user_id=2, event="rescheduled", successor_id=12)]
    )
    [a] = drain(alice)
    assert a == {
        "type": "job",
        "data": {
            "event": "succeeded",
            "id": 10,
            "tag": "tag-1",
            "jobType": "sms",
            "userId": 1,
            "attempt": 1,
            "due": "2024-01-01T00:00:00+00:00",
            "started": "2024-01-01T00:00:01+00:00",
            "finished": "2024-01-01T00:00:02+00:00",
            "successorId": None,
        },
    }
    [b] = drain(bob)
    assert b["data"]["id"] == 11 and b["data"]["successorId"] == 12
    assert [m["data"]["id"] for m in drain(admin)] == [10, 11]
    assert drain(anon) == []


async def test_send_to_user_and_broadcast_isolation() -> None:
    hub = Hub()
    u1 = hub.add_client(Identity(1))
    u1b = hub.add_client(Identity(1))
    u2 = hub.add_client(Identity(2))
    admin = hub.add_client(Identity(3, admin=True))
    anon = hub.add_client(None)
    hub.send_to_user(1, {"type": "note", "data": {"x": 1}})
    hub.broadcast({"type": "all", "data": None})
    note = {"type": "note", "data": {"x": 1}}
    everyone = {"type": "all", "data": None}
    assert drain(u1) == [note, everyone]
    assert drain(u1b) == [note, everyone]
    assert drain(u2) == [everyone]
    assert drain(admin) == [note, everyone]
    assert drain(anon) == [everyone]


async def test_serialised_once_per_publish(monkeypatch: pytest.MonkeyPatch) -> None:
    import qdworker._events.hub as hub_module

    calls = 0
    real = hub_module._dumps

    def counting(obj: Any) -> str:
        nonlocal calls
        calls += 1
        return real(obj)

    monkeypatch.setattr(hub_module, "_dumps", counting)
    hub = Hub()
    clients = [hub.add_client(Identity(1)) for _ in range(5)] + [hub.add_client(None)]
    hub.broadcast({"type": "x"})
    hub.send_to_user(1, {"type": "y"})
    hub.publish_job_events([event(1), event(2)])
    assert calls == 4
    texts = [c._queue[0] for c in clients]
    assert all(t is texts[0] for t in texts)
    # Nobody to deliver to: no serialisation at all.
    hub.send_to_user(77, {"type": "z"})
    hub.publish_job_events([event(3, user_id=77)])
    assert calls == 4


async def test_no_clients_is_cheap() -> None:
    hub = Hub()
    hub.publish_job_events([event(i) for i in range(1000)])
    hub.broadcast({"type": "x"})
    stats = hub.statistics()
    assert stats.published == 1001 and stats.delivered == 0 and stats.clients == 0


async def test_subscription_narrowing_and_successor_following() -> None:
    hub = Hub()
    by_type = hub.add_client(Identity(1))
    by_tag = hub.add_client(Identity(1))
    by_id = hub.add_client(Identity(1))
    combined = hub.add_client(Identity(1))
    hub.set_subscription(by_type, Subscription(job_types=frozenset({"email"})))
    hub.set_subscription(by_tag, Subscription(tags=frozenset({"tag-0"})))
    hub.set_subscription(by_id, Subscription(job_ids=frozenset({4})))
    hub.set_subscription(
        combined, Subscription(job_types=frozenset({"sms"}), tags=frozenset({"tag-0"}))
    )
    hub.publish_job_events([event(i) for i in range(1, 7)])
    hub.publish_job_events(
        [event(4, event="rescheduled", successor_id=40), event(40, event="started")]
    )
    hub.broadcast({"type": "b"})
    hub.send_to_user(1, {"type": "n"})

    def ids(c: HubClient) -> list[Any]:
        return [m["data"]["id"] if m["type"] == "job" else m["type"] for m in drain(c)]

    assert ids(by_type) == [1, 3, 5, "b", "n"]
    assert ids(by_tag) == [3, 6, "b", "n"]
    assert ids(by_id) == [4, 4, 40, "b", "n"]
    assert ids(combined) == [6, "b", "n"]
    hub.set_subscription(by_type, Subscription())
    hub.publish_job_events([event(8)])
    assert ids(by_type) == [8]


async def test_overflow_drops_only_the_slow_client() -> None:
    hub = Hub(client_queue_size=10)
    slow = hub.add_client(Identity(1))
    fast = hub.add_client(Identity(1))
    received: list[int] = []
    done = trio.Event()

    async def consume() -> None:
        while len(received) < 100:
            for text in await fast.receive_batch():
                received.append(json.loads(text)["data"]["id"])
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for i in range(100):
            hub.publish_job_events([event(i)])
            await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            await done.wait()
    assert received == list(range(100))
    assert slow.overflowed and not fast.overflowed
    assert slow.queued == 0
    assert await slow.receive_batch() == []
    with trio.fail_after(1):
        await slow.wait_overflowed()
    stats = hub.statistics()
    assert stats.dropped_clients == 1
    hub.remove_client(slow)
    assert hub.statistics().clients == 1


async def test_remove_wakes_receiver_and_identity_changes() -> None:
    hub = Hub()
    client = hub.add_client(None)
    result: list[list[str]] = []

    async def wait() -> None:
        result.append(await client.receive_batch())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        hub.remove_client(client)
    assert result == [[]]
    hub.remove_client(client)  # idempotent

    c = hub.add_client(None)
    assert hub.user_client_count(5) == 0
    hub.set_identity(c, Identity(5))
    assert hub.user_client_count(5) == 1
    hub.set_identity(c, Identity(5, admin=True))
    assert hub.user_client_count(5) == 1
    assert hub.statistics().admin_clients == 1
    hub.set_identity(c, None)
    stats = hub.statistics()
    assert stats.admin_clients == 0 and stats.anonymous_clients == 1 and stats.users == 0


async def test_handle_ipc() -> None:
    hub = Hub()
    u1 = hub.add_client(Identity(1))
    assert hub.handle_ipc("w1", {"kind": "send-to-user", "user_id": 1, "message": {"type": "a"}})
    assert hub.handle_ipc("w1", {"kind": "broadcast", "message": {"type": "b"}})
    assert hub.handle_ipc("w1", {"kind": "job-events", "events": [event(5)]})
    assert not hub.handle_ipc("w1", {"kind": "heartbeat"})
    assert not hub.handle_ipc("w1", {"kind": "worker-started", "pid": 4})
    # Malformed payloads are counted and dropped.
    assert hub.handle_ipc("w1", {"kind": "send-to-user", "user_id": "1", "message": {}})
    assert hub.handle_ipc("w1", {"kind": "broadcast", "message": [1]})
    assert hub.handle_ipc("w1", {"kind": "job-events", "events": {"x": 1}})
    hub.handle_ipc(
        "w1", {"kind": "job-events", "events": [event(6, event="exploded"), "junk", event(7)]}
    )
    got = drain(u1)
    assert [m["type"] for m in got] == ["a", "b", "job", "job"]
    assert [m["data"]["id"] for m in got if m["type"] == "job"] == [5, 7]
    assert hub.statistics().invalid == 5


async def test_unserialisable_message_is_dropped() -> None:
    hub = Hub()
    c = hub.add_client(None)
    hub.broadcast({"type": "x", "v": float("nan")})
    hub.broadcast({"type": "x", "v": object()})
    assert c.queued == 0
    assert hub.statistics().invalid == 2
