"""``scaling``: :mod:`drain <._drain>` with ``WORKER_COUNT`` 1, 2 and 4 (``Options.scaling``).

Each count is a drain of its own (fresh database, cold start, same N); the scaling figures
repeat those drains' timings with the worker count. The drain with one worker is also the
``drain`` figure.
"""

from __future__ import annotations

from ._figures import Figure


def scaling(drain: Figure, worker_count: int) -> Figure:
    """The scaling figure of a drain measured with ``worker_count`` workers."""
    return Figure(
        "scaling",
        drain.n,
        drain.seconds,
        drain.jobs_per_s,
        settings=drain.settings,
        extra={"worker_count": worker_count, "startup_s": drain.extra.get("startup_s")},
    )


def notes(figure: Figure) -> list[str]:
    x = figure.extra
    return [f"WORKER_COUNT={x.get('worker_count')}, start-up {x.get('startup_s')} s"]
