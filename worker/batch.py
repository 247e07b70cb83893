"""One batch through the fenced exactly-once protocol: lock + confirm, apply, ack + release.

Locks are lanes (docs/design-lock-lanes.md): a counter's entries need this consumer's lane
on it, and the lane of each consumer one of them was claimed from.

1. lock +   one pipeline: a script that takes every lane needed (SET NX PX, one fresh
   confirm  token for the attempt; replicas take turns on busy lanes), then XPENDING of this
            consumer's pending list. Redis runs them in order, so for every counter whose
            lanes we got, the entries listed were still pending *after* we held them; the
            others were finished by someone else (or deleted) and are dropped. Entries
            delivered again since we got them go back to the consumer, to hold.
2. apply    one script for all locked counters, each on its own: check the token on every
            lane, skip entries that already have a marker, INCRBY the exact sum, add
            markers. If a sum fails (overflow), each of its entries is tried on its own so
            that the ones that fit still count.
3. ack +    one pipeline: XACK everything applied or skipped, then a script that releases
   release  the lanes still ours and, if all of them were, clears those entries' markers.

Busy counters are retried after the held ones are released (nobody waits while holding a
lock), with bounded exponential backoff and jitter; what is still busy when LOCK_WAIT_MS is
used up goes back to the caller, to keep in hand for its next turn.

``attempt`` is the protocol for one attempt, written as a generator of round trips: it
yields each step's calls (a ``Round``) and receives their replies. ``apply_all`` drives it
one round trip at a time; ``worker.flow`` drives two batches at once, sending one batch's
ack + release in the same round trip as the next one's lock + confirm.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Container, Generator, Iterator
from typing import Any, NamedTuple

import redis
import structlog

from config import Settings
from worker import counters, stream
from worker.backoff import Backoff
from worker.counters import Group
from worker.events import Event
from worker.lanes import lanes_of
from worker.lock import Locks
from worker.outcome import BatchOutcome, Stats
from worker.scripts import Call, Pipe, Round

Attempt = Generator[Round, list[Any], dict[str, list[Event]]]
"""One attempt: yields rounds, receives their replies, returns the groups whose lock was busy."""


class BatchApplier:
    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        log: structlog.typing.FilteringBoundLogger,
        stats: Stats,
        stopping: Callable[[], bool],
        pipe: Pipe,
    ) -> None:
        self.client = client
        self.pipe = pipe
        self.s = settings
        self.log = log
        self.stats = stats
        self.stopping = stopping
        self.locks = Locks(settings.lock_ttl_ms)
        self.stream_key = settings.stream.encode()
        self._recent: set[str] = set()
        """Lanes of the last attempt: they take turns with waiting replicas."""
        self._queued: set[str] = set()
        """Lanes we found busy and have not had since: they take turns too, so that the
        attempt that gets one clears our place in line."""

    def apply_all(self, held: list[Event]) -> BatchOutcome:
        """Lock, confirm, apply, ack and release every counter in ``held``; wait for busy ones
        only while holding nothing."""
        waiting: dict[str, list[Event]] = defaultdict(list)
        for h in held:
            waiting[h.counter].append(h)
        outcome = BatchOutcome()
        delays: Iterator[float] = Backoff(self.s.lock_wait_ms, cap_ms=20).delays()
        while waiting:
            waiting = self.run(self.attempt(waiting, outcome))
            if not waiting:
                break
            self.stats.lock_busy += len(waiting)
            delay = None if self.stopping() else next(delays, None)
            if delay is None:
                break
            time.sleep(delay)
            outcome.lock_wait_ms += delay * 1000
        self.settle(waiting, outcome)
        return outcome

    def settle(self, busy: dict[str, list[Event]], outcome: BatchOutcome) -> None:
        """The batch is done: what is still busy goes back to the caller; count the rest."""
        for items in busy.values():
            outcome.busy.extend(items)
        self.stats.applied += outcome.applied
        self.stats.duplicates += outcome.duplicates

    def run(self, attempt: Attempt) -> dict[str, list[Event]]:
        """Drive ``attempt`` one round trip at a time."""
        try:
            step = next(attempt)
            while True:
                self.pipe.send([step])
                try:
                    if step.meanwhile is not None:
                        step.meanwhile()
                except BaseException:
                    self.pipe.reset()
                    raise
                step = attempt.send(self.pipe.recv()[0])
        except StopIteration as done:
            busy: dict[str, list[Event]] = done.value
            return busy

    def attempt(self, groups: dict[str, list[Event]], outcome: BatchOutcome) -> Attempt:
        """One attempt for ``groups``: lock + confirm, apply, ack + release (see the top).

        While Redis runs a round trip, the calls of the next one are prepared as if all goes
        well (every lock taken, every entry confirmed, every write done), and used when it
        did: this process and Redis then work at the same time.
        """
        s = self.s
        me = s.consumer
        batch = [h for items in groups.values() for h in items]
        lanes, others = lanes_of(groups, me)
        # Lanes we just had or wanted first: only those take turns with waiting replicas.
        recent, queued = self._recent, self._queued
        keys = [k for n in groups for k in lanes[n]]
        mine = [(k, n) for n in groups if (k := lanes[n][0]) in recent or k in queued]
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
        self._recent = set(keys)
        token = self.locks.tokens.next()
        count = len(batch) + 1000
        lock = self.locks.acquire_call(keys, token, waiters=waiters, me=me).packed()
        confirm = stream.confirm_call(s.stream, s.group, me, count)
        guess: list[Plan] = []
        taken, confirmed = yield Round(
            "lock", [lock, confirm], lambda: guess.append(self._plan(groups, token, lanes))
        )
        for reply in (taken, confirmed):
            if isinstance(reply, Exception):
                # Locks we may have taken expire by TTL; nothing was written.
                raise reply
        pending: dict[bytes, int] = {entry[0]: entry[3] for entry in confirmed}
        if len(confirmed) == count:  # our pending list is longer: ask by id
            unseen = [h.entry_id for h in batch if h.entry_id not in pending]
            if unseen:
                calls = stream.claim_own_calls(s.stream, s.group, me, unseen)
                kept = stream.parse_claim_own((yield Round("confirm", calls)))
                pending.update(kept.counts)
                outcome.deleted += kept.deleted  # off the pending list: dropped below
        missing: list[bytes] = []
        changed: list[Event] = []
        for h in batch:
            times = pending.get(h.entry_id)
            if times is None:
                missing.append(h.entry_id)
            elif times > h.deliveries:
                # Delivered again since we got it (claimed away and back): whose lanes it
                # needs is unknown, so the consumer holds it until every lock taken before
                # now has expired.
                h.deliveries = times
                changed.append(h)
        moved = {h.entry_id for h in changed}
        if changed:  # held, whether their counter is ours or busy: never retried before that
            outcome.held += changed
            for h in changed:
                del pending[h.entry_id]
            groups = {
                n: [h for h in items if h.entry_id not in moved] for n, items in groups.items()
            }
        partial: list[str] = []
        held: list[str] = []
        if taken.count(1) == len(taken):
            held, busy = list(groups), {}
            if queued:
                queued.difference_update(keys)
        else:
            got = {k for k, ok in zip(keys, taken, strict=True) if ok == 1}
            short: list[str] = []
            for n in groups:
                (held if all(k in got for k in lanes[n]) else short).append(n)
            busy = {n: groups[n] for n in short if groups[n]}
            # Busy counters may hold some of their lanes: those are released with the rest.
            partial = [n for n in short if any(k in got for k in lanes[n])]
            queued.update(k for k in keys if k not in got)  # in line for these (lock_acquire.lua)
            queued.difference_update(got)
            if len(queued) > QUEUED_MAX:  # lanes we gave up on (entries finished elsewhere)
                queued.clear()
        if not missing and not changed and guess and held:
            # As guessed, but for busy counters: they stay in the call, and its fencing
            # refuses them (our token does not hold all their lanes): cheaper than a new call.
            plan = guess[0]
            work = {n: groups[n] for n in held} if busy else groups
        else:
            work = {n: [h for h in groups[n] if h.entry_id in pending] for n in held}
            work = {n: items for n, items in work.items() if items}
            plan = self._plan(work, token, lanes)
            dropped = [
                h.entry_id
                for n in held
                for h in groups[n]
                if h.entry_id not in pending and h.entry_id not in moved
            ]
            if dropped:
                self.log.info(
                    "entries no longer pending were dropped: acknowledged by another replica, "
                    "or deleted from the stream",
                    count=len(dropped),
                    ids=[i.decode() for i in dropped[:10]],
                )
        ready: list[Round] = []
        acked = yield from self._apply(
            work,
            plan,
            busy,
            outcome,
            lambda: ready.append(self._ack_release(work, held, partial, lanes, token)),
            token,
        )
        step = (
            ready[0]
            if acked is work and ready
            else self._ack_release(acked, held, partial, lanes, token)
        )
        results = yield step
        for result in results:
            if isinstance(result, Exception):
                raise result
        for name, reply in zip(held + partial, results[-1], strict=True):
            if isinstance(reply, bytes):  # an error text: e.g. the markers key has a wrong type
                self.log.warning("could not release a counter", counter=name, error=reply.decode())
            elif reply == 0 and acked.get(name):
                # A lane expired before the finish: the markers stay until no replica that
                # confirmed these entries before our XACK can write any more.
                self.log.warning(
                    "lock lane lost before the finish: entry markers expire one lock TTL later",
                    counter=name,
                    entries=len(acked[name]),
                )
        return busy

    def _plan(self, work: dict[str, list[Event]], token: str, lanes: dict[str, list[str]]) -> Plan:
        """The first apply call for ``work``. A repeated event_id inside the batch rides on
        its first occurrence (a follower). An entry delivered more than MAX_DELIVERIES
        times is only probed: if it was applied (its replica died before the XACK) it is
        acknowledged, else it is dead-lettered."""
        most = self.s.max_deliveries
        followers: dict[bytes, list[Event]] = defaultdict(list)
        rounds: list[Group] = []
        for name, items in work.items():
            if len(items) == 1 and items[0].deliveries <= most:
                rounds.append(Group(name, items))  # the common case with many counters
                continue
            if all(e.event_id is None and e.deliveries <= most for e in items):
                rounds += _chunks(name, items, False)  # the common case
                continue
            first_of: dict[bytes, bytes] = {}
            candidates: list[Event] = []
            worn: list[Event] = []
            for h in items:
                key = h.event_id
                if key is not None and key in first_of:
                    followers[first_of[key]].append(h)
                    continue
                if key is not None:
                    first_of[key] = h.entry_id
                (worn if h.deliveries > most else candidates).append(h)
            for group in (candidates, worn):
                rounds += _chunks(name, group, group is worn)
        call = counters.apply_call(self.stream_key, token, rounds, self.s.dedupe_window_ms, lanes)
        return Plan(rounds, followers, call.packed(), lanes)

    def _apply(
        self,
        work: dict[str, list[Event]],
        plan: Plan,
        busy: Container[str],
        outcome: BatchOutcome,
        meanwhile: Callable[[], None],
        token: str,
    ) -> Generator[Round, list[Any], dict[str, list[Event]]]:
        """Run the fenced apply script for every locked counter (the plan may also carry
        ``busy`` ones, which it refuses); return, per counter, the entries to acknowledge
        (applied now, or found already applied). When every write of the first call is
        done as planned, that is the work itself (the same object)."""
        most = self.s.max_deliveries
        rounds, followers, call, lanes = plan
        acked: dict[str, list[Event]] = defaultdict(list)
        first = True
        while rounds:
            (raw,) = yield Round("apply", [call], meanwhile if first else None)
            if first and not followers and _as_planned(raw, rounds, busy):
                outcome.applied += sum(len(items) for items in work.values())
                return work  # every write done as planned: acknowledge all of the work
            first = False
            next_rounds: list[Group] = []
            for (name, items, probe), result in zip(
                rounds, counters.parse_apply(raw, len(rounds)), strict=True
            ):
                if name in busy:
                    continue  # refused, as planned: the caller tries them again later
                if result.outcome is counters.Outcome.APPLIED:
                    acked[name] += items
                    outcome.applied += len(items)
                elif result.outcome is counters.Outcome.LOCK_LOST:
                    self.log.warning(
                        "lock lost before the write: write refused, entries kept for a retry",
                        counter=name,
                        entries=len(items),
                    )
                    self.stats.lock_lost += len(items)
                    outcome.lost += items
                elif result.outcome is counters.Outcome.ALREADY_APPLIED:
                    skipped = set(result.skipped)
                    acked[name] += [items[i] for i in skipped]
                    outcome.duplicates += len(skipped)
                    rest = [h for i, h in enumerate(items) if i not in skipped]
                    if rest:
                        next_rounds.append(Group(name, rest, probe))
                elif result.outcome is counters.Outcome.NOT_APPLIED:
                    outcome.failed += [
                        (h, f"delivered {h.deliveries} times, more than MAX_DELIVERIES={most}")
                        for h in items
                    ]
                elif result.transient:
                    # Redis refuses writes for now (OOM, ...): not the entries' fault. Keep
                    # them, finish this batch's acks and releases, then back off.
                    outcome.lost += items
                    outcome.refused = result.error
                elif len(items) == 1:
                    self.stats.write_failures += 1
                    outcome.failed.append((items[0], result.error))
                else:  # the sum failed: try each entry on its own
                    next_rounds += [Group(name, [h], probe) for h in items]
            rounds = next_rounds
            if rounds:
                call = counters.apply_call(
                    self.stream_key, token, rounds, self.s.dedupe_window_ms, lanes
                )

        for items in list(acked.values()):
            for h in list(items):
                extra = followers.pop(h.entry_id, [])
                items += extra
                outcome.duplicates += len(extra)
        for extra in followers.values():
            # Their first occurrence is not done: retry them with it (a busy counter's
            # followers are already among the busy ones).
            outcome.lost += [h for h in extra if h.counter not in busy]
        return acked

    def _ack_release(
        self,
        acked: dict[str, list[Event]],
        held: list[str],
        partial: list[str],
        lanes: dict[str, list[str]],
        token: str,
    ) -> Round:
        """XACK, then per locked counter clear the acknowledged entries' markers and release
        its lanes, in one round trip (Redis runs it in order: markers go only after the
        XACK). Busy counters of which we took some lanes (``partial``) release those."""
        ack_ids = [h.entry_id for items in acked.values() for h in items]
        calls = (
            [Call.command("XACK", self.s.stream, self.s.group, *ack_ids).packed()]
            if ack_ids
            else []
        )
        releases = [(n, lanes[n], [h.entry_id for h in acked.get(n, ())]) for n in held]
        releases += [(n, lanes[n], []) for n in partial]
        finish = counters.finish_call(self.stream_key, token, releases, self.s.lock_ttl_ms)
        calls.append(finish.packed())
        return Round("ack_release", calls, acked=releases)


class Plan(NamedTuple):
    rounds: list[Group]
    followers: dict[bytes, list[Event]]
    call: Call
    lanes: dict[str, list[str]]


QUEUED_MAX = 10_000
"""Bound on the lanes remembered as waited for: a waiter key lives WAITER_TTL_MS anyway."""

MAX_ROUND = 1000
"""Events of one counter in one script call: Lua unpacks at most ~8,000 values into one
command, and a call's markers are 2 per event (entry id, event_id) plus their scores."""


def _as_planned(raw: object, rounds: list[Group], busy: Container[str]) -> bool:
    """Every counter applied (reply 1), but the busy ones, refused by fencing (reply 0)."""
    if not isinstance(raw, list):
        return False
    if raw.count(1) == len(raw):
        return True
    return bool(busy) and all(
        x == 1 or (x == 0 and g.name in busy) for x, g in zip(raw, rounds, strict=True)
    )


def _chunks(name: str, items: list[Event], probe: bool) -> list[Group]:
    return [Group(name, items[i : i + MAX_ROUND], probe) for i in range(0, len(items), MAX_ROUND)]
