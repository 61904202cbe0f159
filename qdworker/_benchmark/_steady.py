"""``steady``: a steady stream of single jobs, open loop (default 500 ``submit_job``/s for
20 s), to an idle (warmed-up) worker.

Done per second = N / (first call -> last ``finished``, the database's clock); latency as
described in :mod:`._paced`. The figure's notes say the rate the producer achieved.
"""

from __future__ import annotations

from ._figures import Figure
from ._paced import notes as paced_notes
from ._paced import paced
from ._run import Run, Session


async def steady(run: Run, session: Session, rate_per_s: float, seconds: float) -> Figure:
    result = await paced(session, int(rate_per_s * seconds), rate_per_s, run.timeout_s)
    took_s = result.last_finished - result.first_call
    return result.figure("steady", took_s, len(result.rows) / took_s, run.settings())


def notes(figure: Figure) -> list[str]:
    return [*paced_notes(figure), f"enqueued {figure.extra.get('rate_achieved')}/s"]
