"""``drain_clients`` (``--clients K``): :mod:`cost <._cost>`'s drain with K websocket clients
connected to ``/ws``.

The clients connect once the supervisor is warmed up (its port is read from its log, it listens
on any free port); in dev mode each is an admin and receives every job's events. Timed and
measured like ``cost``, plus per client the job events received and how its connection closed.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ._cost import IDLE_BEFORE_S, measured_drain
from ._cost import notes as cost_notes
from ._figures import Figure
from ._run import Run, exit_notes
from .procs import Supervisor

CLIENT_READY_WAIT_S = 10.0  # per client, for its first (non-job) message


@dataclass
class _Client:
    messages: int = 0
    job_events: int = 0
    closed: str | None = None


async def drain_clients(run: Run, n: int, clients: int) -> Figure:
    notes: list[str] = []
    async with run.warm_session("drain_clients") as session, trio.open_nursery() as nursery:
        connected = await _connect(nursery, session.supervisor, clients, notes)
        await trio.sleep(IDLE_BEFORE_S)
        workers = session.supervisor.workers()
        figure = await measured_drain(run, "drain_clients", session, workers, n)
        nursery.cancel_scope.cancel()
    if connected:
        figure.extra["clients"] = {
            "connected": len(connected),
            "job_events_received": [c.job_events for c in connected],
            "closed": [c.closed for c in connected if c.closed],
        }
    figure.add_notes([*notes, *exit_notes(session.status)])
    return figure


async def _connect(
    nursery: trio.Nursery, sup: Supervisor, clients: int, notes: list[str]
) -> list[_Client]:
    """Start ``clients`` websocket clients in ``nursery``, each one after the last is ready."""
    port = await sup.ws_port()
    if port is None:
        notes.append("websocket server not found in the supervisor's log: no clients")
        return []
    connected = []
    for _ in range(clients):
        client = _Client()
        connected.append(client)
        ready = trio.Event()
        nursery.start_soon(_ws_client, port, client, ready)
        with trio.move_on_after(CLIENT_READY_WAIT_S):
            await ready.wait()
    return connected


async def _ws_client(port: int, client: _Client, ready: trio.Event | None) -> None:
    from trio_websocket import ConnectionClosed, open_websocket_url

    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
            while True:
                text = await ws.get_message()
                client.messages += 1
                if '"type": "job"' in text or '"type":"job"' in text:
                    client.job_events += 1
                elif ready is not None and not ready.is_set():
                    ready.set()
    except ConnectionClosed as exc:
        client.closed = f"closed {exc.reason.code if exc.reason else '?'}"
    except OSError as exc:
        client.closed = f"error {exc}"


def notes(figure: Figure) -> list[str]:
    x = figure.extra
    out = cost_notes(figure)
    if "clients" in x:
        c = x["clients"]
        events = c["job_events_received"] or [0]
        out.append(
            f"{c['connected']} clients, events {min(events)}-{max(events)}, "
            f"closed {len(c['closed'])}"
        )
    return out
