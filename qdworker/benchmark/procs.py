"""CPU seconds and resident memory of processes, read from ``/proc`` (Linux only).

Everything returns ``None`` where ``/proc`` is missing or unreadable, so the benchmark can say
"not measured" instead of failing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["children_of", "cpu_seconds", "descendants", "rss_bytes", "snapshot"]

_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (all its threads), seconds."""
    fields = _stat(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _CLK


def rss_bytes(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[21]) * _PAGE


def parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[1])


def _all_parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return parents
    for name in names:
        if name.isdigit():
            fields = _stat(int(name))
            if fields is not None:
                parents[int(name)] = int(fields[1])
    return parents


def children_of(pid: int) -> list[int]:
    return [child for child, parent in _all_parents().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    parents = _all_parents()
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        kids = [child for child, parent in parents.items() if parent == current]
        found.extend(kids)
        todo.extend(kids)
    return found


def snapshot(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds by pid (processes that are gone are left out)."""
    out: dict[int, float] = {}
    for pid in pids:
        seconds = cpu_seconds(pid)
        if seconds is not None:
            out[pid] = seconds
    return out


def used(before: dict[int, float], after: dict[int, float], exclude: Iterable[int] = ()) -> float:
    """CPU seconds used between two snapshots by the processes alive at ``after`` (a process
    started in between counts from zero; one that ended in between is lost)."""
    skip = set(exclude)
    return sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid not in skip)
