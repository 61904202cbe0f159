"""Job-event subscriptions: what one websocket client wants to see, and its wire form.

A :class:`Subscription` narrows the job events a client receives (notifications and
broadcasts are never narrowed). :class:`SubscriptionFilter` is the per-client state the hub
tests each job event against: it follows the successors of rescheduled jobs when the client
subscribed to job ids. :func:`parse_subscription` validates the ``data`` of a client's
``subscribe`` message and :func:`subscription_data` renders the ``subscribed`` reply.

Errors: :func:`parse_subscription` raises :class:`TypeError` or :class:`ValueError` with a
message fit to send back to the client; nothing else here raises. Resources: the followed-id
set of a filter, capped at :data:`MAX_SUBSCRIPTION_ITEMS` entries. Not thread-safe (like the
hub, used from the trio thread of the websocket server only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

MAX_SUBSCRIPTION_ITEMS: Final = 1000
"""Upper bound on the entries of each subscription list (incl. followed successors)."""

_SUBSCRIPTION_KEYS: Final = frozenset({"jobTypes", "tags", "jobIds"})


@dataclass(frozen=True, slots=True)
class Subscription:
    """Narrowing of job events for one client.

    ``None`` for a dimension means "any"; dimensions combine with AND,
    entries within one dimension with OR.  When ``job_ids`` is set and a
    followed job is rescheduled, its successor id is followed too (up to
    :data:`MAX_SUBSCRIPTION_ITEMS`).
    """

    job_types: frozenset[str] | None = None
    tags: frozenset[str] | None = None
    job_ids: frozenset[int] | None = None

    @property
    def is_everything(self) -> bool:
        return self.job_types is None and self.tags is None and self.job_ids is None


EVERYTHING: Final = Subscription()


class SubscriptionFilter:
    """A client's :class:`Subscription` plus the job ids it follows (for ``job_ids``)."""

    __slots__ = ("_follow_ids", "subscription")

    def __init__(self, subscription: Subscription = EVERYTHING) -> None:
        self.subscription = subscription
        self._follow_ids: set[int] | None = (
            None if subscription.job_ids is None else set(subscription.job_ids)
        )

    def matches(self, job_type: Any, tag: Any, job_id: Any, successor_id: Any) -> bool:
        """Whether a job event passes; a followed job's ``successor_id`` is followed too."""
        sub = self.subscription
        if sub.job_types is not None and job_type not in sub.job_types:
            return False
        if sub.tags is not None and tag not in sub.tags:
            return False
        follow = self._follow_ids
        if follow is not None:
            if job_id not in follow:
                return False
            if isinstance(successor_id, int) and len(follow) < MAX_SUBSCRIPTION_ITEMS:
                follow.add(successor_id)
        return True


def _strings(data: dict[str, Any], key: str) -> frozenset[str] | None:
    value = data.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_SUBSCRIPTION_ITEMS
        or not all(isinstance(v, str) for v in value)
    ):
        raise ValueError(f"{key} must be a list of at most {MAX_SUBSCRIPTION_ITEMS} strings")
    return frozenset(value)


def _job_ids(data: dict[str, Any]) -> frozenset[int] | None:
    ids = data.get("jobIds")
    if ids is None:
        return None
    if (
        not isinstance(ids, list)
        or len(ids) > MAX_SUBSCRIPTION_ITEMS
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids)
    ):
        raise ValueError(f"jobIds must be a list of at most {MAX_SUBSCRIPTION_ITEMS} integers")
    return frozenset(ids)


def parse_subscription(data: Any) -> Subscription:
    """Validate the ``data`` of a subscribe message; TypeError/ValueError if invalid."""
    if data is None:
        return Subscription()
    if not isinstance(data, dict):
        raise TypeError("subscribe data must be an object")
    unknown = set(data) - _SUBSCRIPTION_KEYS
    if unknown:
        raise ValueError(f"unknown subscribe fields: {sorted(unknown)}")
    job_ids = _job_ids(data)
    return Subscription(
        job_types=_strings(data, "jobTypes"), tags=_strings(data, "tags"), job_ids=job_ids
    )


def subscription_data(sub: Subscription) -> dict[str, Any]:
    """The ``data`` of the ``subscribed`` reply (camelCase, sorted lists, ``None`` = any)."""
    return {
        "jobTypes": None if sub.job_types is None else sorted(sub.job_types),
        "tags": None if sub.tags is None else sorted(sub.tags),
        "jobIds": None if sub.job_ids is None else sorted(sub.job_ids),
    }
