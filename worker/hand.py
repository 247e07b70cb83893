"""What a replica has in hand: pending entries of ours, parsed, kept between turns.

An entry is in hand when its batch could not apply it and it is still ours to apply: its
counter's lane stayed busy, its lane was lost before the write, or Redis refused the write
for now (**waiting**, tried again next turn); or its past owners are unknown (**held** until
every lock taken before it came to us has expired, docs/design-lock-lanes.md rule D).

Redis does not touch entries in hand, so their idle time grows: before another replica
could claim them (CLAIM_IDLE_MS), they are claimed ours again (``claim_own.lua``, no
delivery counted): at once when they come into hand, then every CLAIM_IDLE_MS / 3.
Everything here is values and time; the Redis calls are the consumer's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from worker.events import Event
from worker.stream import Delivery


class Entry(NamedTuple):
    """One pending entry of ours, parsed: the event and what the replica knows of its
    delivery."""

    entry_id: bytes
    event: Event
    deliveries: int
    """How many times Redis delivered it (reads and claims), as last seen."""
    owner: str | None = None
    """The consumer it was claimed from, if another: that consumer's lane is needed too."""


class Hand:
    def __init__(self, claim_idle_ms: int) -> None:
        self.keep_ours_every_s = claim_idle_ms / 3000
        self.waiting: list[Entry] = []
        self.held: dict[bytes, tuple[Entry, float]] = {}
        """Entry id -> (entry, monotonic time before which it must not be applied)."""
        self._kept_at: float | None = None
        """When what is in hand was last claimed ours (None: never, or nothing in hand)."""
        self._claim_now = False

    def __len__(self) -> int:
        return len(self.waiting) + len(self.held)

    @property
    def held_entries(self) -> list[Entry]:
        return [entry for entry, _ in self.held.values()]

    def ids(self) -> list[bytes]:
        return [e.entry_id for e in self.waiting] + list(self.held)

    def wait(self, entries: Iterable[Entry]) -> None:
        """Try these again next turn (they may have waited LOCK_WAIT_MS: claim them ours at
        once)."""
        before = len(self.waiting)
        self.waiting += entries
        self._claim_now = self._claim_now or len(self.waiting) > before

    def hold(self, entries: Iterable[Entry], until: float) -> None:
        for entry in entries:
            self.held[entry.entry_id] = (entry, until)
            self._claim_now = True

    def take_ready(self, now: float) -> list[Entry]:
        """Take out what may be applied now: the waiting entries and the held ones due."""
        ready, self.waiting = self.waiting, []
        due = [i for i, (_, until) in self.held.items() if until <= now]
        ready += (self.held.pop(i)[0] for i in due)
        return ready

    def any_ready(self, now: float) -> bool:
        return bool(self.waiting) or any(until <= now for _, until in self.held.values())

    def next_due(self) -> float | None:
        """When the first held entry may be applied (monotonic), if any is held."""
        return min((until for _, until in self.held.values()), default=None)

    def keep_ours_due(self) -> float | None:
        """When what is in hand must next be claimed ours (monotonic), if anything is."""
        if not len(self):
            return None
        if self._claim_now or self._kept_at is None:
            return 0.0
        return self._kept_at + self.keep_ours_every_s

    def kept(self, counts: Mapping[bytes, int], now: float) -> list[Entry]:
        """The reply of a keep-ours claim: ``counts`` has the delivery count of every entry
        still pending for us. Entries no longer ours (finished or claimed elsewhere) leave
        the hand; those delivered again meanwhile were claimed away and back: they are
        returned, no longer in hand, for the caller to hold anew."""
        self._claim_now, self._kept_at = False, now
        again = [
            e._replace(deliveries=counts[i])
            for e in (*self.waiting, *self.held_entries)
            if (i := e.entry_id) in counts and counts[i] > e.deliveries
        ]
        gone = {e.entry_id for e in again}
        self.waiting = [e for e in self.waiting if e.entry_id in counts and e.entry_id not in gone]
        self.held = {i: h for i, h in self.held.items() if i in counts and i not in gone}
        return again

    def claimed(self, claimed: list[Delivery]) -> list[Delivery]:
        """A claim page: entries already in hand are now pending with the claim's delivery
        count and previous owner, whose lane they need (updated in hand); returns the
        others."""
        where = {e.entry_id: n for n, e in enumerate(self.waiting)}
        rest = []
        for d in claimed:
            if (n := where.get(d.entry_id)) is not None:
                self.waiting[n] = self.waiting[n]._replace(deliveries=d.deliveries, owner=d.owner)
            elif d.entry_id in self.held:
                e, until = self.held[d.entry_id]
                self.held[d.entry_id] = (e._replace(deliveries=d.deliveries, owner=d.owner), until)
            else:
                rest.append(d)
        return rest

    def drop(self) -> None:
        """Forget what is in hand (after an error: it is still pending, and ours). What
        comes back may have been idle through an outage: claim it ours at once."""
        self.waiting, self.held = [], {}
        self._claim_now = True
