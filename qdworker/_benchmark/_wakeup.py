"""``wakeup``: how soon an idle (warmed-up) worker starts a job after its commit.

N single ``submit_job`` calls, a fixed interval apart (default 200, 50 ms): each job meets an
idle worker, woken by NOTIFY. Latency as described in :mod:`._paced`; the figure's seconds are
the producer's (first call -> last return), it has no jobs/s.
"""

from __future__ import annotations

from ._figures import Figure
from ._paced import notes as paced_notes
from ._paced import paced
from ._run import Run, Session


async def wakeup(run: Run, session: Session, n: int, interval_s: float) -> Figure:
    result = await paced(session, n, 1 / interval_s, run.timeout_s)
    return result.figure("wakeup", result.produce_s, None, run.settings())


def notes(figure: Figure) -> list[str]:
    return paced_notes(figure)
