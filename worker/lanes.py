"""Lock lanes (docs/design-lock-lanes.md): which lanes a counter's entries need, and how long
to wait until every lock taken before now has expired.

A counter's lock has one lane per consumer name, ``sc:{c}:lock:<consumer>``. Entries
pending for this consumer need its own lane; an entry claimed from consumer P needs P's
lane too. (A finish that lost a lane makes the markers of the entries it acknowledged
expire a lock TTL later, by Redis' clock: counter_finish.lua.)
"""

from __future__ import annotations

from worker import counters
from worker.events import Event


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
