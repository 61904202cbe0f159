"""Serve an ASGI app with hypercorn's trio worker, inside the caller's nursery.

:func:`serve` reports the bound port through ``task_status`` (so port 0 picks a free one) and
runs until cancelled; a port already in use raises ``OSError`` before ``started``. Requests in
flight when it is cancelled get :data:`GRACEFUL_SECONDS` to finish.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .._logs import module_logger
from .._net import normalize_host

logger = module_logger(__name__)
#: hypercorn's own lines (its errors; not its "Running on ..." line: the supervisor says that).
_HYPERCORN_LOG = logging.getLogger("qdworker.http.hypercorn")
_HYPERCORN_LOG.setLevel(logging.WARNING)

#: How long requests in flight may take to finish when the server stops.
GRACEFUL_SECONDS: Final = 2.0
#: Idle keep-alive connections are closed after this long.
KEEP_ALIVE_SECONDS: Final = 30.0
#: Largest request body accepted (actions send small JSON documents).
MAX_BODY_BYTES: Final = 64 * 1024


def _config(host: str, port: int) -> HypercornConfig:
    config = HypercornConfig()
    shown = f"[{host}]" if ":" in host else host
    config.bind = [f"{shown}:{port}"]
    config.graceful_timeout = GRACEFUL_SECONDS
    config.keep_alive_timeout = KEEP_ALIVE_SECONDS
    config.wsgi_max_body_size = MAX_BODY_BYTES
    config.accesslog = None
    config.errorlog = _HYPERCORN_LOG
    return config


async def serve(
    app: Any,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; ``started(bound_port)``."""
    host = normalize_host(host)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: hypercorn_serve(app, _config(host, port), task_status=task_status)
        )
        bound = int(binds[0].rsplit(":", 1)[1])
        logger.debug("http: serving on %s", ", ".join(binds))
        task_status.started(bound)
