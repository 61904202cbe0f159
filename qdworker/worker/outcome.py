"""How a run ended, and the job event that says so."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from ..model import Job

__all__ = ["Ending", "Outcome", "job_event"]

#: ``release`` gives the job back (shutdown); the others finish it.
Ending = Literal["succeeded", "failed", "timed_out", "cancelled", "release"]


@dataclass(frozen=True, slots=True)
class Outcome:
    job: Job
    ending: Ending
    result: Any = None  # JSON-safe (checked by the runner)
    retry: bool = True  # False: never retried (invalid row, lost too often), even if configured
    encoded: str | None = None  # ``result`` as JSON, when the runner already encoded it

    @property
    def success(self) -> bool:
        return self.ending == "succeeded"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def job_event(
    event: str, job: Job, *, finished: datetime | None = None, successor_id: int | None = None
) -> dict[str, Any]:
    """The IPC job event (snake_case; the hub renames for clients). Never carries data/result."""
    return {
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
