"""What the ``chaos`` job type recorded: every run's start and end, per job, from every worker
process; and the checks the fault tests make on it."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    job_id: int
    claims: int
    pid: int
    start: float
    end: float | None  # None: the process died while the handler ran


def read_runs(path: Path) -> list[Run]:
    """Every run in the file, in start order."""
    runs: dict[tuple[int, int, int], Run] = {}
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        mark, job_id, claims, pid, at = line.split()
        key = (int(job_id), int(claims), int(pid))
        if mark == "S":
            runs[key] = Run(int(job_id), int(claims), int(pid), float(at), None)
        else:
            runs[key].end = float(at)
    return sorted(runs.values(), key=lambda r: r.start)


def overlapping(runs: list[Run], deaths: dict[int, float] | None = None) -> list[tuple[Run, Run]]:
    """Pairs of runs of one job that overlapped in time. A run without an end lasted until its
    process died (``deaths``: pid -> time of the SIGKILL), or for ever if that is unknown."""
    deaths = deaths or {}
    by_job: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        by_job[run.job_id].append(run)
    found = []
    for job_runs in by_job.values():
        for a, b in itertools.pairwise(sorted(job_runs, key=lambda r: r.start)):
            end = a.end if a.end is not None else deaths.get(a.pid, float("inf"))
            if b.start < end:
                found.append((a, b))
    return found


def runs_per_job(runs: list[Run]) -> dict[int, int]:
    counts: dict[int, int] = defaultdict(int)
    for run in runs:
        counts[run.job_id] += 1
    return dict(counts)
