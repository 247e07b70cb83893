"""Lock lanes (docs/design-lock-lanes.md): which lanes a counter's entries need, how long to
wait until every lock taken before now has expired, and markers cleared late.

A counter's lock has one lane per consumer name, ``sc:{c}:lock:<consumer>``. Entries
pending for this consumer need its own lane; an entry claimed from consumer P needs P's
lane too. A finish that lost a lane keeps the markers of the entries it acknowledged, and
they are cleared here once no replica that confirmed those entries can write any more.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis
import structlog

from worker import counters, scripts
from worker.connection import is_transient
from worker.events import Event
from worker.scripts import Call


def settle_s(lock_ttl_ms: int) -> float:
    """Seconds after which every lock taken before now has expired by Redis' clock:
    LOCK_TTL_MS, plus a margin for clock rates and whole-millisecond expiry (10% + 10 ms)."""
    return lock_ttl_ms * 1.1 / 1000 + 0.01


def lanes_of(
    groups: dict[str, list[Event]], me: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per counter, the lane keys its entries need: ours first, then the lane of every
    consumer one of them was claimed from; and, for the counters that need such lanes,
    those consumers (in the same order)."""
    lane = counters.lane_key
    lanes = {name: [lane(name, me)] for name in groups}
    others: dict[str, list[str]] = {}
    if any(h.owner is not None for items in groups.values() for h in items):
        for name, items in groups.items():
            owners = sorted({h.owner for h in items if h.owner is not None and h.owner != me})
            if owners:
                others[name] = owners
                lanes[name] += [lane(name, o) for o in owners]
    return lanes, others


class LateClears:
    """Markers kept by finishes that had lost a lane, cleared once due: LOCK_TTL_MS after
    their XACK every lock taken before it has expired, so nobody can still write those
    entries (docs/design-lock-lanes.md, rule B). Lost if the process stops first: such
    markers then expire after DEDUPE_WINDOW_MS."""

    def __init__(
        self,
        client: redis.Redis,
        stream_key: bytes,
        lock_ttl_ms: int,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.client = client
        self.stream_key = stream_key
        self.lock_ttl_ms = lock_ttl_ms
        self.log = log
        self._items: list[tuple[float, str, list[bytes]]] = []
        """(due, counter, entry ids)"""

    def add(self, counter: str, events: Iterable[Event]) -> None:
        """The finish of ``counter`` lost a lane (its reply just arrived)."""
        ids = [h.entry_id for h in events]
        self._items.append((time.monotonic() + settle_s(self.lock_ttl_ms), counter, ids))
        self.log.warning(
            "lock lane lost before the finish: entry markers cleared later",
            counter=counter,
            entries=len(ids),
        )

    def run(self) -> None:
        """Clear what is due, in one round trip (nothing to do most of the time)."""
        if not self._items:
            return
        now = time.monotonic()
        due = [item for item in self._items if item[0] <= now]
        if not due:
            return
        self._items = [item for item in self._items if item[0] > now]
        marker, src = counters.entry_marker, self.stream_key
        calls = [
            Call.command("ZREM", counters.applied_key(n), *[marker(src, i) for i in ids])
            for _, n, ids in due
        ]
        try:
            results = scripts.run(self.client, calls)
        except redis.RedisError:
            self._items = due + self._items
            raise
        for item, result in zip(due, results, strict=True):
            if isinstance(result, Exception):
                if is_transient(result):  # e.g. READONLY during a failover: next turn
                    self._items.append(item)
                else:
                    self.log.warning(
                        "could not clear entry markers", counter=item[1], error=str(result)
                    )
