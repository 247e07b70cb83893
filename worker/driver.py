"""Batches back to back on one connection, two in flight.

Every batch goes through the same stages (``worker.batch``), whatever its origin: new
entries, claimed ones, our own backlog, entries in hand. The driver sends the batches'
rounds and hands back their replies; what it decides is how round trips are shared, and
what this process does while Redis works:

    round trip                                   meanwhile, in this process
    take lanes N, read N+1                       plan N's write as if every lane was taken
    write N                                      parse N+1; plan N's finish
    finish N + take lanes N+1, read N+2          plan N+1's write
    write N+1                                    parse N+2; plan N+1's finish ...

Redis runs a round trip's calls in the order sent, so N's lanes are released (and its
markers removed after its XACK) before N+1 asks for them, and N+1's entries are confirmed
pending after its lanes are taken. Reads do not block. Reading stops when the stream has
nothing more, when a batch gives entries back (busy or lost lanes, a refused write), at the
caller's deadline, or when stopping; the driver then finishes what is in flight.

Busy entries (their counter's lanes held by another replica) are tried again without
holding anything meanwhile: a few (a quarter of a batch) ride with the batch after next;
with nothing to ride on, they are tried alone after a backoff; each within LOCK_WAIT_MS of
being found busy. The rest are given back, to keep in hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from config import Settings
from worker import stream
from worker.backoff import Backoff
from worker.batch import Batch, Outcome, Parsed, Protocol, Stage, parse_read
from worker.hand import Entry
from worker.scripts import Pipe, Round


class Driver:
    def __init__(self, pipe: Pipe, p: Protocol, settings: Settings) -> None:
        self.pipe = pipe
        self.p = p
        self.read = stream.read_call(
            settings.stream, settings.group, settings.consumer, settings.batch_size, None
        )
        self.wait_s = settings.lock_wait_ms / 1000
        self.ride_max = settings.batch_size // 4

    def drive(
        self, first: Parsed, count: int, more: bool, until: float, stopping: Callable[[], bool]
    ) -> Iterator[Outcome]:
        """Run ``first`` (``count`` entries read) and, if ``more``, the batches of new entries
        that follow it until ``until`` (monotonic); yield each batch's outcome once done.
        Raises the error of a failed read once what was in flight is done."""
        cur: Batch | None = Batch(self.p, first, count)
        nxt: Batch | None = None
        raw: Any = None  # a read's reply, parsed when its batch starts
        read_error: Exception | None = None
        busy = _Busy(self.wait_s, self.ride_max)
        while cur is not None:
            if cur.done:
                outcome = cur.outcome
                ride = busy.ride(outcome, bool(raw))
                nothing_to_ride = not ride and nxt is None and not raw and not stopping()
                alone = busy.alone(outcome) if nothing_to_ride else []
                yield outcome
                more = more and outcome.clean and not stopping() and time.monotonic() < until
                cur, nxt = nxt, None
                if cur is None and raw:
                    cur, raw = self._start(parse_read(raw), busy.take_riders()), None
                elif cur is None and alone:
                    cur = busy.retry(self.p, alone)
                continue
            owners = [cur]
            if cur.stage is Stage.FINISH and nxt is not None and not nxt.done:
                owners.append(nxt)  # its take-lanes round, right after our release
            rounds = [b.round for b in owners]
            reading = more and raw is None and (nxt is None or nxt in owners)
            if reading:
                rounds.append(Round("read", [self.read]))
            self.pipe.send(rounds)
            try:
                for b in owners:  # while Redis works: prepare what comes next
                    b.plan_ahead()
                if raw and nxt is None:
                    nxt, raw = self._start(parse_read(raw), busy.take_riders()), None
            except BaseException:
                self.pipe.reset()  # no later recv may read this send's replies
                raise
            replies = self.pipe.recv()
            try:
                for b, reply in zip(owners, replies, strict=False):
                    b.advance(reply)
            except BaseException:
                if cur.done:  # finished: count it before the error
                    yield cur.outcome
                raise
            if reading:
                (reply,) = replies[-1]
                if isinstance(reply, Exception):
                    read_error, reply = reply, []
                raw = reply  # nil when the stream has nothing new
                more = bool(raw) and not stopping() and time.monotonic() < until
        if read_error is not None:
            raise read_error

    def _start(self, parsed: Parsed, riders: list[Entry]) -> Batch:
        read = len(parsed.entries) + len(parsed.rejected)
        parsed.entries.extend(riders)
        return Batch(self.p, parsed, read)


class _Busy:
    """Busy entries of one drive, and when each was first found busy."""

    def __init__(self, wait_s: float, ride_max: int) -> None:
        self.wait_s = wait_s
        self.ride_max = ride_max
        self.since: dict[bytes, float] = {}
        self.riders: list[Entry] = []
        self.delays: Iterator[float] | None = None
        self._delay = 0.0

    def ride(self, outcome: Outcome, next_read: bool) -> bool:
        """A few busy entries of a batch that wrote something ride with the batch after
        next (the replica holding their lanes releases them meanwhile, and leaves them to
        us on its next attempt); taken out of ``outcome.busy``."""
        entries = outcome.busy
        if not entries:
            self.delays = None  # the next busy entries get LOCK_WAIT_MS of backoff anew
            return False
        now = time.monotonic()
        for e in entries:
            self.since.setdefault(e.entry_id, now)
        if not (next_read and outcome.applied):
            return False
        if len(self.riders) + len(entries) > self.ride_max:
            return False
        if any(now - self.since[e.entry_id] >= self.wait_s for e in entries):
            return False
        self.riders += entries
        outcome.busy = []
        return True

    def take_riders(self) -> list[Entry]:
        riders, self.riders = self.riders, []
        return riders

    def alone(self, outcome: Outcome) -> list[Entry]:
        """Busy entries with nothing to ride on: tried alone after a backoff, while
        LOCK_WAIT_MS lasts; taken out of ``outcome.busy``."""
        if not outcome.busy:
            return []
        if self.delays is None:
            self.delays = Backoff(int(self.wait_s * 1000), cap_ms=20).delays()
        now = time.monotonic()
        left = self.wait_s - max(now - self.since.get(e.entry_id, now) for e in outcome.busy)
        delay = next(self.delays, None)
        if delay is None or left <= 0:
            return []
        self._delay = min(delay, left)
        entries, outcome.busy = outcome.busy, []
        return entries

    def retry(self, p: Protocol, entries: list[Entry]) -> Batch:
        """Wait the backoff (holding no lock), then a batch of ``entries`` alone."""
        time.sleep(self._delay)
        batch = Batch(p, Parsed(entries, [], []), 0)
        batch.outcome.lock_wait_ms = self._delay * 1000
        return batch
