"""Claiming entries left pending by dead or stuck replicas, inside the read loop.

Every ``interval`` seconds the consumer sweeps the group's pending list for entries idle
for CLAIM_IDLE_MS, any consumer's, one page per loop turn until the sweep wraps
(reclaim.lua: XPENDING IDLE, then XCLAIM, atomically, reporting each entry's previous
owner, whose lock lane the apply then needs; see docs/design-lock-lanes.md). It claims its
own stale entries too, which is how an entry whose write failed is retried. Ids no longer
in the stream were removed from the pending list by XCLAIM (Redis >= 7.0); they are
logged, there is nothing left to count.

When a sweep completes, consumers with nothing pending that have been idle for
10 x CLAIM_IDLE_MS are removed from the group (killed replicas leave their names behind).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis

from worker import replicas, scripts
from worker.stream import Delivery

PRUNE = scripts.Script.load("prune_consumers")
RECLAIM = scripts.Script.load("reclaim")


@dataclass(slots=True)
class ClaimResult:
    claimed: list[Delivery] = field(default_factory=list)
    deleted: list[bytes] = field(default_factory=list)
    pruned: list[bytes] = field(default_factory=list)


class Reclaimer:
    def __init__(
        self, client: redis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.min_idle_ms = min_idle_ms
        self.interval = replicas.interval_s(min_idle_ms)
        self._cursor = b"0-0"
        self._next_sweep = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._next_sweep

    @property
    def next_sweep(self) -> float:
        """When the next sweep is due (monotonic; in the past while a sweep is under way)."""
        return self._next_sweep

    def claim(self, count: int) -> ClaimResult:
        """One page of the sweep: entries idle for CLAIM_IDLE_MS, now ours, with their
        delivery counts and previous owners (None when it was this consumer)."""
        start = b"-" if self._cursor == b"0-0" else b"(" + self._cursor
        args: list[str | bytes | int] = [self.group, self.consumer, self.min_idle_ms, start, count]
        reply = RECLAIM(self.client, [self.stream], args)
        self._cursor = bytes(reply[0])
        pruned: list[bytes] = []
        if self._cursor == b"0-0":
            self._next_sweep = time.monotonic() + self.interval
            pruned = self.prune_consumers()
        me = self.consumer
        claimed = []
        for entry_id, fields, owner, times in reply[1]:
            previous = owner.decode(errors="replace")
            claimed.append(
                Delivery(bytes(entry_id), fields, int(times), None if previous == me else previous)
            )
        return ClaimResult(claimed=claimed, deleted=[bytes(i) for i in reply[2]], pruned=pruned)

    def prune_consumers(self) -> list[bytes]:
        """Remove other consumers with nothing pending, idle for 10 x CLAIM_IDLE_MS, whose
        replica has not said lately that it is alive (``worker.replicas``)."""
        keys = [self.stream, replicas.replicas_key(self.stream), replicas.terms_key(self.stream)]
        live_ms = replicas.live_window_ms(self.min_idle_ms)
        result = PRUNE(
            self.client, keys, [self.group, self.min_idle_ms * 10, self.consumer, live_ms]
        )
        return [bytes(name) for name in result]

    def restart(self) -> None:
        """Sweep from the start again on the next turn (after a reconnect)."""
        self._cursor = b"0-0"
        self._next_sweep = 0.0
