"""Claiming entries left pending by dead or stuck replicas (XAUTOCLAIM), inside the read loop.

Every ``interval`` seconds the consumer sweeps the group's pending list with XAUTOCLAIM
(min idle = CLAIM_IDLE_MS), one COUNT-sized page per loop turn until the cursor wraps. It
claims its own stale entries too, which is how an entry whose write failed is retried.
Ids XAUTOCLAIM reports as deleted (Redis >= 7.0) were already removed from the pending list
by Redis; they are logged, there is nothing left to count.

When a sweep completes, consumers with nothing pending that have been idle for
10 x CLAIM_IDLE_MS are removed from the group (killed replicas leave their names behind).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis

from worker import scripts
from worker.scripts import Call
from worker.stream import Delivery, delivery_counts, parse_entries

PRUNE = scripts.Script.load("prune_consumers")


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
        self.interval = max(0.05, min(min_idle_ms / 2000, 5.0))
        self._cursor = b"0-0"
        self._next_sweep = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._next_sweep

    def claim(self, count: int) -> ClaimResult:
        """One XAUTOCLAIM page; delivery counts are read back for what it claimed."""
        reply = scripts.command(
            self.client,
            "XAUTOCLAIM",
            self.stream,
            self.group,
            self.consumer,
            self.min_idle_ms,
            self._cursor,
            "COUNT",
            count,
        )
        self._cursor = bytes(reply[0])
        pruned: list[bytes] = []
        if self._cursor == b"0-0":
            self._next_sweep = time.monotonic() + self.interval
            pruned = self.prune_consumers()
        entries = parse_entries(reply[1])
        deleted = [bytes(i) for i in reply[2]] if len(reply) > 2 else []
        counts = delivery_counts(self.client, self.stream, self.group, [i for i, _ in entries])
        return ClaimResult(
            claimed=[Delivery(i, f, counts.get(i, 1)) for i, f in entries if i in counts],
            deleted=deleted,
            pruned=pruned,
        )

    def prune_consumers(self) -> list[bytes]:
        """Remove other consumers with nothing pending, idle for 10 x CLAIM_IDLE_MS."""
        call = Call.eval(PRUNE, [self.stream], [self.group, self.min_idle_ms * 10, self.consumer])
        (result,) = scripts.run(self.client, [call])
        if isinstance(result, Exception):
            raise result
        return [bytes(name) for name in result]

    def restart(self) -> None:
        """Sweep from the start again on the next turn (after a reconnect)."""
        self._cursor = b"0-0"
        self._next_sweep = 0.0
