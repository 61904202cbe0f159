"""What the benchmark reports: :class:`Figure` (one measured figure = one JSON line), the
nearest-rank percentiles and per-1,000-jobs ratios it is made of, and its two renderings: JSON
lines (``--json``) and a fixed-width table whose last column holds each workload's notes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

BYTES_PER_MB = 2**20
_HEAD = ("workload", "n", "seconds", "jobs/s", "p50 ms", "p95 ms", "p99 ms", "notes")

#: A workload's notes for the table's last column, from its figure.
Notes = Callable[["Figure"], list[str]]


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass
class Figure:
    """One measured figure (one JSON line)."""

    workload: str
    n: int
    seconds: float | None
    jobs_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    loadavg: float | None = field(default_factory=loadavg)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "workload": self.workload,
            "n": self.n,
            "seconds": rounded(self.seconds, 4),
            "jobs_per_s": rounded(self.jobs_per_s, 1),
        }
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            value = getattr(self, key)
            if value is not None:
                out[key] = rounded(value, 3)
        out["settings"] = self.settings
        out["loadavg_1m"] = self.loadavg
        out.update({k: v for k, v in self.extra.items()})
        if self.note:
            out["note"] = self.note
        return out

    def add_notes(self, notes: Iterable[str]) -> None:
        """Append ``notes`` to :attr:`note` (``"; "``-separated)."""
        notes = list(notes)
        if notes:
            self.note = "; ".join(filter(None, [self.note, *notes]))


def rounded(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (the peers benchmark's definition)."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def ms_percentiles(seconds: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """p50, p95 and p99 of durations in seconds, in milliseconds."""
    values = [s * 1000 for s in seconds]
    return percentile(values, 50), percentile(values, 95), percentile(values, 99)


def per_1k(value: float | None, n: int) -> float | None:
    return None if value is None or n <= 0 else round(value * 1000 / n, 4)


def rss_mb(rss: Iterable[int | None]) -> list[float | None]:
    """Resident sizes in bytes as MB, one decimal (``None``: not measured)."""
    return [rounded(r / BYTES_PER_MB, 1) if r else None for r in rss]


def ms(seconds_per_1k: float | None) -> str:
    """CPU seconds per 1,000 jobs as whole milliseconds per 1,000 jobs (``-``: not measured)."""
    return "-" if seconds_per_1k is None else f"{seconds_per_1k * 1000:.0f}"


def dumps(figure: Figure) -> str:
    return json.dumps(figure.as_json(), sort_keys=False)


def render_table(figures: Sequence[Figure], notes: Notes) -> str:
    """A fixed-width table of the figures (the human-readable output); ``notes`` gives each
    figure's notes, the figure's own :attr:`Figure.note` follows them."""
    rows = [_HEAD, *(_row(fig, [*notes(fig), *filter(None, [fig.note])]) for fig in figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEAD) - 1)]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(widths))]
        lines.append("  ".join(cells) + "  " + r[-1])
    return "\n".join(lines)


def _row(fig: Figure, notes: list[str]) -> tuple[str, ...]:
    return (
        fig.workload,
        str(fig.n),
        _number(fig.seconds, 3),
        _number(fig.jobs_per_s, 0),
        _number(fig.p50_ms, 2),
        _number(fig.p95_ms, 2),
        _number(fig.p99_ms, 2),
        "; ".join(notes),
    )


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"
