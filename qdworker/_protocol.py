"""What the supervisor and its worker processes say to each other: one definition of the
IPC frame format, the message kinds and their shapes, and the job event (in the IPC form and
in the form websocket clients get).

**Frames.** Each frame is a 4-byte big-endian unsigned length followed by exactly that many
bytes of UTF-8 JSON: an object with a string ``"kind"``. At most :data:`MAX_FRAME_BYTES`.

* :func:`send` raises :class:`FrameTooLargeError` (before writing anything) when the encoded
  message exceeds the frame limit, and :class:`ValueError` for messages that cannot be encoded
  (no ``kind``, NaN, non-JSON values). Stream errors from ``send_all`` propagate unchanged.
* :func:`frames` never raises because of what the peer sent: malformed and oversized frames
  are logged (warning, truncated) and dropped, and the reader carries on with the next frame.
  ``trio.BrokenResourceError`` and ``trio.ClosedResourceError`` end the iteration like EOF
  does; any other stream error propagates.
* Memory is bounded on both sides: the reader never holds more than one maximum-size frame
  plus one receive chunk; oversized frames are skipped in fixed-size chunks.
* Neither side is safe for concurrent use of one stream from several tasks: use a single
  sender task (or a ``trio.Lock``) per stream.

**Kinds** (worker to supervisor unless noted):

=====================  ==========================================================================
``worker-started``     ``{"worker_id", "pid"}``: the worker is ready
``heartbeat``          ``{"running", "completed", "failed", "claimed", "tally"}``, every second;
                       ``tally``: what ran since the last one, see :func:`heartbeat`
``worker-shutdown``    ``{"worker_id", "exit_code"}``: it is stopping
``worker-error``       ``{"error"}``: why it cannot start (before it exits)
``send-to-user``       ``{"user_id", "message"}``: for that user's websocket clients
``broadcast``          ``{"message"}``: for every websocket client
``job-events``         ``{"events": [event, ...]}``: see :func:`job_event`
``events``             supervisor to worker: ``{"wanted": bool}``, whether anyone wants job events
=====================  ==========================================================================
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any, Final

import trio

from ._logs import module_logger
from ._model import Job

logger = module_logger(__name__)

MAX_FRAME_BYTES: Final = 1024 * 1024
"""Largest accepted frame payload (the JSON bytes, excluding the header)."""

DEFAULT_IPC_FD_ENV_VAR: Final = "QDWORKER_IPC_FD"
"""Environment variable naming the inherited IPC socket fd in a child."""

RECEIVE_CHUNK_BYTES: Final = 64 * 1024
"""Upper bound for one ``receive_some`` call (normal and discarding reads)."""

LOG_REPR_CHARS: Final = 200
"""How much of a rejected frame is shown in the warning log."""

_HEADER: Final = struct.Struct(">I")
_HEADER_BYTES: Final = _HEADER.size


class FrameTooLargeError(ValueError):
    """The encoded message is larger than the frame limit; nothing was sent."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def encode_frame(msg: Mapping[str, Any], *, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Return header + JSON payload for ``msg``.

    Raises :class:`TypeError` if ``msg`` has no string ``kind``,
    :class:`ValueError` if it is not strict JSON (NaN/Infinity,
    non-serialisable values), and
    :class:`FrameTooLargeError` if the payload exceeds ``max_frame_bytes``.
    """
    kind = msg.get("kind")
    if not isinstance(kind, str):
        raise TypeError("IPC message needs a string 'kind'")
    try:
        payload = json.dumps(
            msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"IPC message of kind {kind!r} is not encodable as JSON: {exc}") from exc
    if len(payload) > max_frame_bytes:
        raise FrameTooLargeError(
            f"IPC message of kind {kind!r} is {len(payload)} bytes;"
            f" the limit is {max_frame_bytes} bytes"
        )
    return _HEADER.pack(len(payload)) + payload


async def send(
    stream: trio.abc.SendStream,
    msg: Mapping[str, Any],
    *,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> None:
    """Encode ``msg`` as one frame and write it with a single ``send_all``.

    Validation errors (see :func:`encode_frame`) are raised before any byte is
    written, so the stream stays usable.  Stream errors propagate.
    """
    await stream.send_all(encode_frame(msg, max_frame_bytes=max_frame_bytes))


def _truncated(data: bytes | bytearray | memoryview) -> str:
    shown = bytes(data[:LOG_REPR_CHARS])
    suffix = "..." if len(data) > LOG_REPR_CHARS else ""
    return f"{shown!r}{suffix}"


def _decode(payload: bytes) -> dict[str, Any] | None:
    """Decode one payload, or log why it is dropped and return None."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        logger.warning("dropping IPC frame: invalid UTF-8: %s", _truncated(payload))
        return None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        logger.warning("dropping IPC frame: invalid JSON: %s", _truncated(payload))
        return None
    if not isinstance(obj, dict):
        logger.warning("dropping IPC frame: not a JSON object: %s", _truncated(payload))
        return None
    if not isinstance(obj.get("kind"), str):
        logger.warning("dropping IPC frame: no string 'kind': %s", _truncated(payload))
        return None
    return obj


async def frames(
    stream: trio.abc.ReceiveStream,
    *,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> AsyncIterator[dict[str, Any]]:
    """Yield each valid message received on ``stream`` until EOF.

    Invalid frames are logged and skipped (see the module docstring).  A
    trailing partial frame at EOF is logged and discarded.  The generator
    holds no cancel scopes or nurseries, so it may be abandoned at any point;
    prefer ``contextlib.aclosing`` for prompt cleanup.
    """
    buf = bytearray()
    try:
        while True:
            # Parse everything that is already buffered.
            while len(buf) >= _HEADER_BYTES:
                (length,) = _HEADER.unpack_from(buf)
                if length > max_frame_bytes:
                    del buf[:_HEADER_BYTES]
                    logger.warning(
                        "dropping IPC frame: %d bytes exceeds limit of %d bytes",
                        length,
                        max_frame_bytes,
                    )
                    in_buffer = min(length, len(buf))
                    del buf[:in_buffer]
                    if not await _discard(stream, length - in_buffer):
                        return
                    continue
                end = _HEADER_BYTES + length
                if len(buf) < end:
                    break
                payload = bytes(buf[_HEADER_BYTES:end])
                del buf[:end]
                obj = _decode(payload)
                if obj is not None:
                    yield obj
            # buf now holds less than one frame (<= header + max_frame_bytes),
            # so it never grows beyond that plus one chunk.
            data = await stream.receive_some(RECEIVE_CHUNK_BYTES)
            if not data:
                if buf:
                    logger.warning(
                        "IPC stream ended inside a frame; dropping %d trailing bytes", len(buf)
                    )
                return
            buf += data
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        logger.debug("IPC stream closed: %r", exc)


async def _discard(stream: trio.abc.ReceiveStream, count: int) -> bool:
    """Read and drop ``count`` bytes in bounded chunks; False on early EOF."""
    while count > 0:
        data = await stream.receive_some(min(count, RECEIVE_CHUNK_BYTES))
        if not data:
            logger.warning("IPC stream ended inside an oversized frame")
            return False
        count -= len(data)
    return True


def socketpair() -> tuple[trio.SocketStream, socket.socket]:
    """Create the supervisor/child channel.

    Returns the parent's end wrapped as a ``trio.SocketStream`` and the
    child's raw socket.  Pass the child's socket via
    ``trio.run_process(..., pass_fds=(sock.fileno(),), env={**os.environ,
    **ipc_env(sock)})`` and close it in the parent once the child has been
    spawned; the parent stream is closed with ``aclose()`` by its owner.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent))
    except BaseException:
        parent.close()
        child.close()
        raise
    return stream, child


def ipc_env(child_sock: socket.socket, env_var: str = DEFAULT_IPC_FD_ENV_VAR) -> dict[str, str]:
    """Environment entries telling the child which fd carries the IPC stream."""
    return {env_var: str(child_sock.fileno())}


def child_stream_from_env(env_var: str = DEFAULT_IPC_FD_ENV_VAR) -> trio.SocketStream:
    """Wrap the inherited IPC socket named by ``env_var`` (child side).

    Takes ownership of the fd: closing the returned stream closes it.
    Raises :class:`RuntimeError` if the variable is missing, not an integer,
    or does not name a stream socket.
    """
    raw = os.environ.get(env_var)
    if raw is None:
        raise RuntimeError(
            f"{env_var} is not set; this process was not started by the qdworker supervisor"
        )
    try:
        fd = int(raw)
    except ValueError:
        raise RuntimeError(f"{env_var} must be an integer file descriptor, got {raw!r}") from None
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise RuntimeError(f"{env_var}={fd} is not a usable socket: {exc}") from exc
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise RuntimeError(f"{env_var}={fd} is not a stream socket")
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


# --------------------------------------------------------------------------- messages

WORKER_STARTED: Final = "worker-started"
HEARTBEAT: Final = "heartbeat"

#: Upper bounds (ms) of the pickup-latency histogram (started - due) that workers count and
#: ``qdworker_throughput.pickup_ms_hist`` stores (one more entry counts what is above).
PICKUP_BOUNDS_MS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                           60000, 300000)  # fmt: skip
#: Upper bounds (ms) of the run-duration histogram (one more entry counts what is above).
RUN_BOUNDS_MS: Final = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                        300000, 900000, 3600000)  # fmt: skip
#: The counts of one tally entry (a heartbeat's ``tally``), besides its queue, type and the
#: histograms ``run_hist`` (:data:`RUN_BOUNDS_MS`) and ``pickup_hist`` (:data:`PICKUP_BOUNDS_MS`).
TALLY_COUNTS: Final = ("started", "succeeded", "failed", "timed_out", "cancelled", "retried",
                       "lost", "run_ms", "pickup_ms")  # fmt: skip
WORKER_SHUTDOWN: Final = "worker-shutdown"
WORKER_ERROR: Final = "worker-error"
SEND_TO_USER: Final = "send-to-user"
BROADCAST: Final = "broadcast"
JOB_EVENTS: Final = "job-events"
EVENTS_WANTED: Final = "events"
#: Messages about a worker's own life; the supervisor keeps them (the others are routed on).
LIFECYCLE_KINDS: Final = frozenset({WORKER_STARTED, HEARTBEAT, WORKER_SHUTDOWN, WORKER_ERROR})
#: Largest message a job may send to users, as JSON (the relay and SQL functions agree).
MAX_MESSAGE_BYTES: Final = 64 * 1024


def check_message(message: Any) -> None:
    """Raise ``TypeError`` unless ``message`` (for users' websocket clients) is a JSON object,
    ``ValueError`` if it is not JSON or larger than :data:`MAX_MESSAGE_BYTES` as JSON."""
    if not isinstance(message, Mapping):
        raise TypeError("a user message must be a JSON object, e.g. {'type': ..., 'data': ...}")
    size = len(json.dumps(message, allow_nan=False))
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message is {size} bytes as JSON; the limit is {MAX_MESSAGE_BYTES}")


def worker_started(worker_id: str, pid: int) -> dict[str, Any]:
    return {"kind": WORKER_STARTED, "worker_id": worker_id, "pid": pid}


def heartbeat(
    *, running: int, completed: int, failed: int, claimed: int, tally: list[dict[str, Any]]
) -> dict[str, Any]:
    """``tally``: one entry per (queue, type) that had runs since the last heartbeat: its
    ``queue``, ``type``, the :data:`TALLY_COUNTS` and the two histograms (deltas, not totals)."""
    return {
        "kind": HEARTBEAT,
        "running": running,
        "completed": completed,
        "failed": failed,
        "claimed": claimed,
        "tally": tally,
    }


def worker_shutdown(worker_id: str, exit_code: int) -> dict[str, Any]:
    return {"kind": WORKER_SHUTDOWN, "worker_id": worker_id, "exit_code": exit_code}


def worker_error(error: str) -> dict[str, Any]:
    return {"kind": WORKER_ERROR, "error": error}


def send_to_user(user_id: int, message: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": SEND_TO_USER, "user_id": user_id, "message": message}


def broadcast(message: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": BROADCAST, "message": message}


def job_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": JOB_EVENTS, "events": events}


def events_wanted(wanted: bool) -> dict[str, Any]:
    return {"kind": EVENTS_WANTED, "wanted": wanted}


# --------------------------------------------------------------------------- job events

#: What a job event says happened.
JOB_EVENT_KINDS: Final = frozenset(
    {"started", "progress", "succeeded", "failed", "rescheduled", "cancelled", "timed_out"}
)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def job_event(
    event: str,
    job: Job,
    *,
    finished: datetime | None = None,
    successor_id: int | None = None,
    progress: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A job event as workers send it (snake_case; :func:`job_event_for_client` gives the
    clients' form). ``event`` is ``started``, ``progress`` (with ``progress``, the value the
    row stores), ``succeeded``, ``failed``, ``timed_out``, ``cancelled`` or ``rescheduled``
    (with ``successor_id``). Never carries the job's data or result."""
    built: dict[str, Any] = {
        "event": event,
        "id": job.id,
        "tag": job.tag,
        "type": job.type,
        "user_id": job.user_id,
        "attempt": job.attempt,
        "due": _iso(job.due),
        "started": _iso(job.started),
        "finished": _iso(finished),
        "successor_id": successor_id,
    }
    if progress is not None:
        built["progress"] = progress
    return built


def job_event_for_client(event: Mapping[str, Any]) -> dict[str, Any]:
    """A worker's job event as websocket clients get it (QuickDapp-style camelCase); a
    ``progress`` event also has ``progress`` (``fraction``, ``message``, ``data``, ``at``)."""
    data: dict[str, Any] = {
        "event": event["event"],
        "id": event["id"],
        "tag": event.get("tag"),
        "jobType": event.get("type"),
        "userId": event["user_id"],
        "attempt": event.get("attempt"),
        "due": event.get("due"),
        "started": event.get("started"),
        "finished": event.get("finished"),
        "successorId": event.get("successor_id"),
    }
    if "progress" in event:
        data["progress"] = event["progress"]
    return {"type": "job", "data": data}
