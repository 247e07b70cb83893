"""Entries deleted from the stream (XDEL, MAXLEN trimming) while pending: were they counted?

A pending entry whose stream entry is gone cannot be applied (its fields are gone), and it
leaves the pending list: reclaim.lua's XCLAIM drops it, and the consumer acknowledges one
found in its own backlog. If a replica applied it and died before acknowledging it, its
entry marker is in its counter's markers key, but the counter is unknown: this walks the
keyspace (SCAN of the markers keys, one page per turn of the loop) looking for the marker.
Found: the entry was counted, and its marker is made to expire one lock TTL later
(counter_finish.lua with no lane). Not found once the walk is over: it was never counted,
and the event is lost. Deleting pending entries is an operator's mistake, so this cost (a
walk of the keyspace) is paid only then.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis
import structlog
from redis.exceptions import ResponseError

from worker import counters
from worker.connection import is_transient

MARKERS_KEYS = "sc:{*}:applied"
PAGE = 100
"""Keys per SCAN call; each markers key among them costs one ZMSCORE of the ids."""
IDS_PER_WALK = 1000
"""Ids one walk looks for (the rest wait for the next walk)."""
MAX_QUEUED = 10_000
"""Ids waiting for a walk; more are not searched (a trim far below the pending entries)."""
BUDGET_S = 0.02
"""Time one turn of the loop gives the walk."""


@dataclass(frozen=True, slots=True)
class Verdict:
    entry_id: bytes
    counter: str | None
    """The counter it was counted in before it was deleted, or None: it never was."""


class DeletedEntries:
    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        lock_ttl_ms: int,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.client = client
        self.log = log or structlog.get_logger()
        self.stream_key = stream.encode()
        self.lock_ttl_ms = lock_ttl_ms
        self._looking: set[bytes] = set()
        """Ids the walk in progress looks for."""
        self._queued: set[bytes] = set()
        """Ids found deleted during a walk: the next walk looks for them (a walk joined
        halfway could miss a key it passed before)."""
        self._cursor = 0

    def add(self, ids: Iterable[bytes]) -> list[bytes]:
        """Look for these ids' markers; returns those left out (too many waiting)."""
        new = [i for i in ids if i not in self._looking and i not in self._queued]
        room = max(0, MAX_QUEUED - len(self._queued))
        self._queued.update(new[:room])
        if not self._looking:
            self._next_walk()
        return new[room:]

    def busy(self) -> bool:
        return bool(self._looking)

    def restart(self) -> None:
        """Walk again from the start (after a lost connection: the server may be another)."""
        self._cursor = 0

    def give_up(self) -> list[bytes]:
        """Stop looking (the search failed for good); returns the ids not told apart."""
        ids = sorted(self._looking | self._queued)
        self._looking, self._queued, self._cursor = set(), set(), 0
        return ids

    def found(self, ids: list[bytes]) -> None:
        """Pending entries found deleted from the stream are out of the pending list (the
        claim dropped them, or we acknowledged them): look for their markers, to tell
        whether they were counted."""
        if not ids:
            return
        self.log.info(
            "pending entries were deleted from the stream; looking for their markers to "
            "tell whether they were counted",
            ids=[i.decode() for i in ids],
        )
        left_out = self.add(ids)
        if left_out:
            self.log.warning(
                "too many deleted entries to look for: whether these were counted is unknown",
                count=len(left_out),
                ids=[i.decode() for i in left_out[:10]],
            )

    def walk_and_report(self) -> None:
        """A little more of the walk, and a log line per entry told apart. It gives up on an
        error that will not pass (say, SCAN refused by an ACL): that must not stop the
        counting. A transient error is raised (the loop backs off)."""
        try:
            verdicts = self.walk()
        except ResponseError as exc:
            if is_transient(exc):
                raise
            ids = self.give_up()
            self.log.warning(
                "could not look for the markers of deleted entries: whether they were "
                "counted is unknown",
                error=str(exc),
                count=len(ids),
                ids=[i.decode() for i in ids[:10]],
            )
            return
        for verdict in verdicts:
            if verdict.counter is None:
                self.log.warning(
                    "entry deleted from the stream before it was counted: that event is lost",
                    entry_id=verdict.entry_id.decode(),
                )
            else:
                self.log.info(
                    "entry deleted from the stream had been counted: nothing lost",
                    entry_id=verdict.entry_id.decode(),
                    counter=verdict.counter,
                )

    def walk(self) -> list[Verdict]:
        """Walk on for BUDGET_S (a page at least): the ids whose marker it found, and those
        of a walk that ended without finding theirs (never counted)."""
        verdicts: list[Verdict] = []
        end = time.monotonic() + BUDGET_S
        while self._looking:
            cursor, keys = self.client.scan(self._cursor, MARKERS_KEYS, PAGE, "zset")
            verdicts += self._look_in([k if isinstance(k, bytes) else k.encode() for k in keys])
            self._cursor = cursor  # only once the page is done: a failure redoes it
            if self._cursor == 0:  # the walk is over: what it did not find was not counted
                verdicts += [Verdict(i, None) for i in sorted(self._looking)]
                self._looking = set()
            if not self._looking:
                self._next_walk()
            if time.monotonic() >= end:
                break
        return verdicts

    def _next_walk(self) -> None:
        ids = sorted(self._queued)[:IDS_PER_WALK]
        self._looking = set(ids)
        self._queued.difference_update(ids)
        self._cursor = 0

    def _look_in(self, keys: list[bytes]) -> list[Verdict]:
        if not keys:
            return []
        wanted = sorted(self._looking)
        markers = [counters.entry_marker(self.stream_key, i) for i in wanted]
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zmscore(key, markers)  # type: ignore[arg-type]
        replies = pipe.execute(raise_on_error=False)
        found: dict[str, list[bytes]] = {}
        for key, scores in zip(keys, replies, strict=True):
            if isinstance(scores, Exception):
                continue  # the key changed type since the SCAN: not a markers key any more
            name = key[len(b"sc:{") : -len(b"}:applied")].decode(errors="replace")
            for entry_id, score in zip(wanted, scores, strict=True):
                if score is not None:
                    found.setdefault(name, []).append(entry_id)
        if not found:
            return []
        # No lane proves that nobody still writes these entries: their markers expire one
        # lock TTL from now, when every lock taken before they left the pending list has.
        counters.expire_soon(self.client, self.stream_key, found, self.lock_ttl_ms)
        verdicts = [Verdict(i, name) for name, ids in found.items() for i in ids]
        self._looking.difference_update(v.entry_id for v in verdicts)
        return verdicts
