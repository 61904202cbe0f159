"""Batches with a ``then`` job (fan-in): the checks, and the one statement that inserts the
batch and the job depending on all of it (``insert_jobs_then`` in ``sql/queries/jobs.sql``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .._fields import prepare_job
from .._model import Batch, Job
from ..errors import InvalidJobError
from .store import Steps


def prepare_then(prepared: Sequence[Mapping[str, Any]], then: Mapping[str, Any]) -> dict[str, Any]:
    """Check a batch that gets a ``then`` job, and that job's fields; return them prepared.

    Raises :class:`InvalidJobError`: an empty batch (nothing to wait for), a keep-mode entry
    (it might not be inserted, and a dependency on a job not inserted cannot be kept), or a
    bad field of ``then`` (named, as :func:`prepare_job` does).
    """
    if not prepared:
        raise InvalidJobError("submit_jobs(then=...) needs at least one job to wait for")
    if any(entry.get("on_tag_conflict") == "keep" for entry in prepared):
        raise InvalidJobError('submit_jobs(then=...) takes no on_tag_conflict="keep" entry')
    if not isinstance(then, Mapping):
        raise InvalidJobError("then must be the fields of one job (a mapping)")
    out = prepare_job(then)
    if out.get("on_tag_conflict") == "keep":
        raise InvalidJobError('the then job cannot use on_tag_conflict="keep"')
    return out


def then_params(prepared: Sequence[Mapping[str, Any]], then: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of ``insert_jobs_then``; ``then`` gets the batch's trace context."""
    trace = prepared[0].get("trace_context")
    entry = dict(then) if trace is None else {**then, "trace_context": trace}
    return {"jobs": json.dumps(list(prepared)), "then": json.dumps(entry)}


def then_steps(params: Mapping[str, Any]) -> Steps[Batch]:
    """The batch and its ``then`` job, inserted by one statement. The ``then`` job is inserted
    after the batch (it reads the batch's ids), so its id is the highest."""
    rows: list[Job] = yield "insert_jobs_then", params
    ordered = sorted(rows, key=lambda job: job.id)
    return Batch(ordered[:-1], ordered[-1])
