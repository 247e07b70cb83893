"""Lock lanes (docs/design-lock-lanes.md): which lanes a counter's entries need, and how long
to wait until every lock taken before now has expired.

A counter's lock has one lane per consumer name, ``sc:{c}:lock:<consumer>``. Entries
pending for this consumer need its own lane; an entry claimed from consumer P needs P's
lane too. (A finish that lost a lane makes the markers of the entries it acknowledged
expire a lock TTL later, by Redis' clock: counter_finish.lua.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from worker import counters

if TYPE_CHECKING:
    from worker.hand import Entry


def settle_s(lock_ttl_ms: int) -> float:
    """Seconds after which every lock taken before now has expired by Redis' clock:
    LOCK_TTL_MS, plus a margin for clock rates and whole-millisecond expiry (10% + 10 ms)."""
    return lock_ttl_ms * 1.1 / 1000 + 0.01


def lanes_of(
    by_counter: dict[str, list[Entry]], me: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per counter, the lane keys its entries need: ours first, then the lane of every
    consumer one of them was claimed from; and, for the counters that need such lanes,
    those consumers (in the same order)."""
    lane = counters.lane_key
    lanes = {name: [lane(name, me)] for name in by_counter}
    others: dict[str, list[str]] = {}
    if any(h.owner is not None for items in by_counter.values() for h in items):
        for name, items in by_counter.items():
            owners = sorted({h.owner for h in items if h.owner is not None and h.owner != me})
            if owners:
                others[name] = owners
                lanes[name] += [lane(name, o) for o in owners]
    return lanes, others


QUEUED_MAX = 10_000
"""Bound on the lanes remembered as waited for: a waiter key lives WAITER_TTL_MS anyway."""


class Turns:
    """Which lanes take turns with waiting replicas (lock_acquire.lua): those of our last
    attempt, and those we found busy and have not had since (so that the attempt that gets
    one clears our place in line). Other lanes are taken whenever they are free."""

    def __init__(self) -> None:
        self.recent: set[str] = set()
        self.queued: set[str] = set()

    def order(
        self, lanes: dict[str, list[str]], others: dict[str, list[str]], me: str
    ) -> tuple[list[str], list[str]]:
        """The lane keys of one attempt, those that take turns first, and the waiter keys
        of those (lock_acquire.lua's KEYS)."""
        recent, queued = self.recent, self.queued
        keys = [k for n in lanes for k in lanes[n]]
        mine = [(k, n) for n in lanes if (k := lanes[n][0]) in recent or k in queued]
        first = [k for k, _ in mine]
        waiters = [counters.waiter_key(n, me) for _, n in mine]
        for n, owners in others.items():
            for owner, k in zip(owners, lanes[n][1:], strict=True):
                if k in recent or k in queued:
                    first.append(k)
                    waiters.append(counters.waiter_key(n, owner))
        if first:
            firsts = set(first)
            keys = first + [k for k in keys if k not in firsts]
        self.recent = set(keys)
        return keys, waiters

    def taken(self, keys: Sequence[str], got: set[str] | None) -> None:
        """After an attempt on ``keys``: ``got`` the lanes taken (None: all of them)."""
        if got is None:
            if self.queued:
                self.queued.difference_update(keys)
            return
        self.queued.update(k for k in keys if k not in got)
        self.queued.difference_update(got)
        if len(self.queued) > QUEUED_MAX:  # lanes we gave up on (entries finished elsewhere)
            self.queued.clear()
