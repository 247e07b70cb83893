"""Batches back to back, two in flight on one connection.

Each batch goes through the same protocol (``batch.BatchApplier.attempt``), in the same
order in Redis; what changes is how round trips are shared and what this process does
while Redis works:

    round trip                                  meanwhile, in this process
    apply N                                     parse batch N+1, prepare its lock call
    ack + release N, lock + confirm N+1, read N+2
    apply N+1                                   parse batch N+2 ...

Redis runs a round trip's calls in the order sent, so N's locks are released (and its
markers cleared after its XACK) before N+1 asks for them, and N+1's entries are confirmed
pending after its locks are held. Reads do not block; when the stream has nothing more,
a batch ends with something to retry (busy or lost locks), the consumer is stopping or a
reclaim is due, the flow finishes what it has in flight and hands back to the consumer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.batch import Attempt, BatchApplier
from worker.deadletter import Rejected
from worker.events import Event
from worker.outcome import BatchOutcome
from worker.scripts import Call, Pipe, Round
from worker.stream import Delivery, parse_new


@dataclass(slots=True)
class Job:
    """One batch: what was read, its events and its progress through the protocol."""

    batch: list[Delivery]
    started: float
    valid: list[Event] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    gone: list[bytes] = field(default_factory=list)
    """Pending entries of ours deleted from the stream: nothing to apply."""
    outcome: BatchOutcome = field(default_factory=BatchOutcome)
    attempt: Attempt | None = None
    step: Round | None = None
    """The round trip it waits to send; None once it is done."""
    busy: dict[str, list[Event]] = field(default_factory=dict)

    def advance(self, replies: list[Any]) -> None:
        assert self.attempt is not None
        try:
            self.step = self.attempt.send(replies)
        except StopIteration as done:
            self.busy = done.value
            self.step = None


class Flow:
    def __init__(
        self,
        pipe: Pipe,
        applier: BatchApplier,
        read: Call,
        prepare: Callable[[list[Delivery]], Job],
        conclude: Callable[[Job, bool], str],
        keep_reading: Callable[[], bool],
        clean: Callable[[], bool],
    ) -> None:
        self.pipe = pipe
        self.applier = applier
        self.read = read
        """A non-blocking XREADGROUP of new entries."""
        self.prepare = prepare
        self.conclude = conclude
        self.keep_reading = keep_reading
        self.clean = clean
        """Whether the consumer has nothing kept in hand (else the flow winds down)."""

    def run(self, first: list[Delivery]) -> str:
        """Process ``first`` and the batches that follow it (see the top). Returns the first
        transient refusal met (e.g. OOM), after finishing what was in flight, or ''."""
        cur: Job | None = self._start(first, [])
        nxt: Job | None = None
        raw: Any = None  # a read's reply, parsed when its batch starts
        reading = True
        refused = ""
        carry: list[Event] = []  # busy entries to try again with the batch after next
        carried_since: dict[bytes, float] = {}  # entry id -> first carried (monotonic)
        room = self.applier.s.batch_size // 4
        wait_s = self.applier.s.lock_wait_ms / 1000
        while cur is not None:
            if cur.step is None:  # done
                self.applier.stats.lock_busy += len(cur.busy)
                busy = [e for items in cur.busy.values() for e in items]
                if busy and raw and cur.outcome.applied and len(carry) + len(busy) <= room:
                    # A few entries whose counter another replica holds: go on, and try
                    # them again a batch later (that replica releases it meanwhile, and
                    # leaves it to us on its next attempt). Each for LOCK_WAIT_MS at most,
                    # a quarter of a batch at most; else they are kept in hand and the
                    # consumer waits for them with backoff.
                    now = time.monotonic()
                    since = {e.entry_id: carried_since.get(e.entry_id, now) for e in busy}
                    if all(now - t < wait_s for t in since.values()):
                        carry += busy
                        cur.busy = {}
                    # Carried entries skip the batch in between (it may have busy entries
                    # of its own): remember the ones still carried, or in that batch.
                    ahead = {e.entry_id for e in carry}
                    if nxt is not None:
                        ahead.update(e.entry_id for e in nxt.valid)
                    carried_since = {
                        i: t for i, t in {**carried_since, **since}.items() if i in ahead
                    }
                self.applier.settle(cur.busy, cur.outcome)
                # (no stall sleep here: the next batch may hold locks; the flow ends instead)
                refused = refused or self.conclude(cur, False)
                reading = reading and not refused and self.clean() and self.keep_reading()
                cur, nxt = nxt, None
                if cur is None and raw:
                    cur, raw, carry = self._start(parse_new(raw), carry), None, []
                continue
            owners = [cur]
            if cur.step.step == "ack_release" and nxt is not None and nxt.step is not None:
                owners.append(nxt)  # its lock round, right after our release
            rounds = [job.step for job in owners if job.step is not None]
            read = reading and raw is None and (nxt is None or nxt in owners)
            if read:
                rounds.append(Round("read", [self.read]))
            self.pipe.send(rounds)
            try:
                for step in rounds:  # while Redis works: prepare what comes next
                    if step.meanwhile is not None:
                        step.meanwhile()
                if raw and nxt is None:
                    nxt, raw, carry = self._start(parse_new(raw), carry), None, []
            except BaseException:
                self.pipe.reset()  # no later recv may read this send's replies
                raise
            replies = self.pipe.recv()
            try:
                for job, reply in zip(owners, replies, strict=False):
                    job.advance(reply)
            except BaseException:
                if cur.step is None:  # acknowledged and released: account for it
                    self.applier.settle(cur.busy, cur.outcome)
                    self.conclude(cur, False)
                raise
            if read:
                (reply,) = replies[-1]
                if isinstance(reply, Exception):
                    raise reply
                raw = reply  # nil when the stream has nothing new
                reading = bool(raw) and self.keep_reading()
        return refused

    def _start(self, batch: list[Delivery], carried: list[Event]) -> Job:
        job = self.prepare(batch)
        job.valid += carried
        if job.valid:
            groups: dict[str, list[Event]] = {}
            for event in job.valid:
                groups.setdefault(event.counter, []).append(event)
            job.attempt = self.applier.attempt(groups, job.outcome)
            job.step = next(job.attempt)
        return job
