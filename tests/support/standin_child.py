"""A stand-in worker child for supervisor tests: ``python standin_child.py MODE``.

Speaks the real IPC protocol (``qdworker._supervisor.ipc`` frames on ``QDWORKER_IPC_FD``) with
blocking sockets, so the supervisor side is tested against a real process. Modes:

``crash``       exit 3 at once (a worker whose job modules fail to import)
``ok``          started, a broadcast, heartbeats every 0.1 s; SIGTERM: a ``bye`` broadcast,
                worker-shutdown, exit 0. With ``STANDIN_JOB_ID`` it first takes that job's
                lease (like a claim) and keeps it (as a handler that ignores cancellation).
``lease-crash`` take ``STANDIN_JOB_ID``'s lease, send worker-started, exit 1
``hang``        started and one heartbeat, then ignore SIGTERM and block forever
``slow-stop``   like ``ok``, but the first SIGTERM only announces ``stopping`` (still
                heartbeating, as when finishing jobs); the second exits 0
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from qdworker._protocol import encode_frame

MODE = sys.argv[1]
WORKER_ID = os.environ["QDWORKER_WORKER_ID"]
SOCK = socket.socket(fileno=int(os.environ["QDWORKER_IPC_FD"]))
SIGTERMS = 0


def send(msg: dict[str, object]) -> None:
    SOCK.sendall(encode_frame(msg))


def take_lease() -> None:
    import psycopg

    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "UPDATE worker_jobs SET lease_owner = %s, lease_expires_at = now() + interval '1 hour',"
            " started = now(), claims = claims + 1 WHERE id = %s",
            (WORKER_ID, int(os.environ["STANDIN_JOB_ID"])),
        )


def on_term(signum: int, frame: object) -> None:
    global SIGTERMS
    SIGTERMS += 1
    if signum == signal.SIGUSR1:  # the supervisor's "hurry": as good as a second SIGTERM
        SIGTERMS = max(SIGTERMS, 2)


if MODE == "crash":
    sys.exit(3)

signal.signal(signal.SIGTERM, signal.SIG_IGN if MODE == "hang" else on_term)
signal.signal(signal.SIGUSR1, signal.SIG_IGN if MODE == "hang" else on_term)
if "STANDIN_JOB_ID" in os.environ:
    take_lease()
send({"kind": "worker-started", "worker_id": WORKER_ID, "pid": os.getpid()})

if MODE == "lease-crash":
    sys.exit(1)

if MODE == "hang":
    send({"kind": "heartbeat", "running": 1, "completed": 0, "failed": 0, "claimed": 1})
    while True:
        time.sleep(3600)

send({"kind": "broadcast", "message": {"hello": WORKER_ID}})
completed = 0
announced = False
while True:
    if (SIGTERMS and MODE == "ok") or SIGTERMS >= 2:
        send({"kind": "broadcast", "message": {"bye": WORKER_ID}})
        send({"kind": "worker-shutdown", "worker_id": WORKER_ID})
        sys.exit(0)
    if SIGTERMS == 1 and not announced:
        announced = True
        send({"kind": "broadcast", "message": {"stopping": WORKER_ID}})
    completed += 1
    send({"kind": "heartbeat", "running": 2, "completed": completed, "failed": 1, "claimed": 3})
    time.sleep(0.1)
