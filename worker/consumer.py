"""The worker loop: read, dead-letter, lock, confirm, apply, acknowledge, release, reclaim.

One batch goes through these round trips (DESIGN.md, "A protocol that meets these"):

1. read     XREADGROUP (or XAUTOCLAIM / our own pending list); parse; invalid entries and
            entries delivered too often go to the dead-letter stream (atomic with XACK).
2. lock +   one pipeline: SET NX PX per counter, then XCLAIM ... JUSTID of the batch's ids.
   confirm  Redis runs them in order, so for every lock we got, the ids it returns were
            still pending *after* we held the lock; the others were finished by someone else.
3. apply    one fenced script per locked counter (pipelined): check the token, skip entries
            that already have a marker, INCRBY the sum, add markers.
4. ack +    one pipeline: XACK everything applied or skipped, then per counter a script that
   release  clears those entries' markers and releases the lock if the token still holds it.

Busy counters are retried after the held ones are released, with bounded exponential
backoff and jitter; what is still busy when LOCK_WAIT_MS is used up is kept in hand for the
next turn of the loop. A crash anywhere leaves entries pending and the markers make their
redelivery a no-op.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import redis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config import Settings
from worker import counters, deadletter, events, scripts, stream
from worker.backoff import Backoff, reconnect_delay
from worker.connection import ensure_group, is_transient
from worker.deadletter import Rejected
from worker.errors import InvalidEvent
from worker.events import Event
from worker.lock import Locks
from worker.reclaim import Reclaimer
from worker.scripts import Call
from worker.stream import Delivery

Held = tuple[Event, int]
"""An event in hand, with its delivery count."""


@dataclass(slots=True)
class Stats:
    applied: int = 0
    duplicates: int = 0
    refused: str = ""
    """A transient Redis error that refused a write (e.g. OOM): back off after the batch."""
    dead_lettered: int = 0
    write_failures: int = 0
    lock_lost: int = 0
    lock_busy: int = 0
    reclaimed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class BatchOutcome:
    lost: list[Held] = field(default_factory=list)
    failed: list[tuple[Held, str]] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    refused: str = ""
    """A transient Redis error that refused a write (e.g. OOM): back off after the batch."""


class Consumer:
    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        log: structlog.typing.FilteringBoundLogger,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.s = settings
        self.log = log
        self.stopping = stopping
        self.locks = Locks(client, settings.lock_ttl_ms)
        self.reclaimer = Reclaimer(
            client, settings.stream, settings.group, settings.consumer, settings.claim_idle_ms
        )
        self.stats = Stats()
        self._deferred: list[Held] = []
        self._backlog: bytes | None = b"0-0"  # first read our own pending entries
        self._backlog_is_redelivery = True  # at start: our name's predecessor died
        self._connection_failures = 0

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        ensure_group(self.client, self.s.stream, self.s.group)
        last_report = time.monotonic()
        while not self.stopping():
            try:
                self.step()
                if self._connection_failures:
                    self.log.info("redis reachable again", after_failures=self._connection_failures)
                    self._connection_failures = 0
            except (RedisConnectionError, RedisTimeoutError) as exc:
                self._on_unavailable(exc)
            except ResponseError as exc:
                if is_transient(exc):
                    self._on_unavailable(exc)
                    continue
                if not str(exc).startswith("NOGROUP"):
                    raise
                self.log.warning("consumer group missing; creating it again", error=str(exc))
                self._reset_after_error()
                ensure_group(self.client, self.s.stream, self.s.group)
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                self.log.info("progress", **self.stats.as_dict())
        self._hand_back()

    def step(self) -> None:
        """One turn: a reclaim page when due, then a read, each processed in full."""
        room = self.s.batch_size - len(self._deferred)
        # Our own pending list first (after a start or an error): XAUTOCLAIM would count
        # our own entries as redelivered.
        if self._backlog is None and self.reclaimer.due() and room > 0:
            result = self.reclaimer.claim(room)
            if result.deleted:
                self.log.warning(
                    "pending entries were deleted from the stream before being counted",
                    ids=[i.decode() for i in result.deleted],
                )
            in_hand = {h[0].entry_id for h in self._deferred}
            claimed = [d for d in result.claimed if d.entry_id not in in_hand]
            if claimed:
                self.stats.reclaimed += len(claimed)
                self.log.info("claimed idle entries", count=len(claimed))
                self.process(claimed)
                room = self.s.batch_size - len(self._deferred)
        self.process(self._read(room) if room > 0 else [])

    def _read(self, room: int) -> list[Delivery]:
        s = self.s
        if self._backlog is not None:
            read = (
                stream.read_own_pending
                if self._backlog_is_redelivery
                else stream.refetch_own_pending
            )
            batch = read(self.client, s.stream, s.group, s.consumer, self._backlog, room)
            if batch:
                self._backlog = batch[-1].entry_id
                return batch
            self._backlog = None
        block = None if self._deferred else s.block_ms
        return stream.read_new(self.client, s.stream, s.group, s.consumer, room, block)

    # -- one batch -----------------------------------------------------------------------

    def process(self, batch: list[Delivery]) -> None:
        started = time.perf_counter()
        valid: list[Held] = self._deferred
        self._deferred = []
        rejected: list[Rejected] = []
        for item in batch:
            if item.fields is None:
                rejected.append(
                    Rejected(
                        item.entry_id, [], "entry was deleted from the stream before it was counted"
                    )
                )
            elif item.deliveries > self.s.max_deliveries:
                rejected.append(
                    Rejected(
                        item.entry_id,
                        item.fields,
                        f"delivered {item.deliveries} times, "
                        f"more than MAX_DELIVERIES={self.s.max_deliveries}",
                    )
                )
            else:
                try:
                    valid.append((events.parse(item.entry_id, item.fields), item.deliveries))
                except InvalidEvent as exc:
                    rejected.append(Rejected(item.entry_id, item.fields, exc.reason))
        self._dead_letter(rejected)
        outcome = self._apply_all(valid) if valid else BatchOutcome()
        self._after_failures(outcome.failed)
        if batch or valid:
            self.log.debug(
                "batch",
                read=len(batch),
                applied=outcome.applied,
                duplicates=outcome.duplicates,
                rejected=len(rejected),
                failed=len(outcome.failed),
                deferred=len(self._deferred),
                ms=round((time.perf_counter() - started) * 1000, 2),
            )

    def _apply_all(self, held: list[Held]) -> BatchOutcome:
        """Lock, confirm, apply, ack and release every counter in ``held``; wait for busy ones
        only while holding nothing."""
        waiting: dict[str, list[Held]] = defaultdict(list)
        for h in held:
            waiting[h[0].counter].append(h)
        outcome = BatchOutcome()
        delays: Iterator[float] = Backoff(self.s.lock_wait_ms).delays()
        while waiting:
            waiting = self._lock_and_apply(waiting, outcome)
            if not waiting:
                break
            self.stats.lock_busy += len(waiting)
            delay = None if self.stopping() else next(delays, None)
            if delay is None:
                break
            time.sleep(delay)
        # Still busy: keep them in hand for the next turn (they stay pending, ours).
        for items in waiting.values():
            self._deferred.extend(items)
        self._deferred.extend(outcome.lost)
        self.stats.applied += outcome.applied
        self.stats.duplicates += outcome.duplicates
        if outcome.refused:
            raise ResponseError(outcome.refused)
        return outcome

    def _lock_and_apply(
        self, groups: dict[str, list[Held]], outcome: BatchOutcome
    ) -> dict[str, list[Held]]:
        """One attempt for ``groups``; returns the groups whose lock was busy."""
        s = self.s
        names = list(groups)
        tokens, calls = self.locks.acquire_calls([counters.lock_key(n) for n in names])
        ids = [h[0].entry_id for n in names for h in groups[n]]
        calls.append(stream.confirm_call(s.stream, s.group, s.consumer, ids))
        results = scripts.run(self.client, calls)
        confirmed = results.pop()
        if isinstance(confirmed, Exception):
            # The locks we just took expire by TTL; nothing was written.
            raise confirmed
        pending = {bytes(i) for i in confirmed}
        held: dict[str, str] = {}
        busy: dict[str, list[Held]] = {}
        for name, token, result in zip(names, tokens, results, strict=True):
            if isinstance(result, Exception):
                raise result
            if result is True or result == b"OK":
                held[name] = token
            else:
                busy[name] = groups[name]
        work = {n: [h for h in groups[n] if h[0].entry_id in pending] for n in held}
        acked = self._apply(work, held, outcome)
        self._ack_and_release(acked, held)
        return busy

    def _apply(
        self, work: dict[str, list[Held]], held: dict[str, str], outcome: BatchOutcome
    ) -> dict[str, list[Held]]:
        """Run the fenced apply script for every locked counter; return, per counter, the
        entries to acknowledge (applied now, or found already applied)."""
        ttl = self.s.dedupe_window_ms
        # A repeated event_id inside the batch rides on its first occurrence.
        followers: dict[bytes, list[Held]] = defaultdict(list)
        rounds: list[tuple[str, list[Held]]] = []
        for name, items in work.items():
            first_of: dict[bytes, bytes] = {}
            candidates: list[Held] = []
            for h in items:
                key = h[0].event_id
                if key is not None and key in first_of:
                    followers[first_of[key]].append(h)
                    continue
                if key is not None:
                    first_of[key] = h[0].entry_id
                candidates.append(h)
            if candidates:
                rounds.append((name, candidates))

        acked: dict[str, list[Held]] = defaultdict(list)
        while rounds:
            calls = [
                counters.apply_call(n, held[n], [h[0] for h in items], ttl) for n, items in rounds
            ]
            results = scripts.run(self.client, calls)
            next_rounds: list[tuple[str, list[Held]]] = []
            for (name, items), raw in zip(rounds, results, strict=True):
                result = counters.parse_apply(raw)
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
                        next_rounds.append((name, rest))
                elif is_transient(result.error):
                    # Redis refuses writes for now (OOM, ...): not the entries' fault. Keep
                    # them, finish this batch's acks and releases, then back off.
                    outcome.lost += items
                    outcome.refused = result.error
                elif len(items) == 1:
                    outcome.failed.append((items[0], result.error))
                else:  # the sum failed: try each entry on its own
                    next_rounds += [(name, [h]) for h in items]
            rounds = next_rounds

        for items in list(acked.values()):
            for h in list(items):
                extra = followers.pop(h[0].entry_id, [])
                items += extra
                outcome.duplicates += len(extra)
        for extra in followers.values():
            outcome.lost += extra  # their first occurrence is not done: retry them with it
        return acked

    def _ack_and_release(self, acked: dict[str, list[Held]], held: dict[str, str]) -> None:
        """XACK, then per locked counter clear the acknowledged entries' markers and release
        the lock, in one pipeline (Redis runs it in order: markers go only after the XACK)."""
        ack_ids = [h[0].entry_id for items in acked.values() for h in items]
        calls = [Call.command("XACK", self.s.stream, self.s.group, *ack_ids)] if ack_ids else []
        calls += [
            counters.finish_call(n, held[n], [h[0].entry_id for h in acked.get(n, ())])
            for n in held
        ]
        results = scripts.run(self.client, calls)
        for result in results:
            if isinstance(result, Exception):
                raise result

    def _after_failures(self, failed: list[tuple[Held, str]]) -> None:
        """A failed write leaves the entry pending (retried after CLAIM_IDLE_MS); on its
        MAX_DELIVERIES-th delivery it is dead-lettered with Redis' error as the reason."""
        if not failed:
            return
        self.stats.write_failures += len(failed)
        final: list[Rejected] = []
        for (event, deliveries), error in failed:
            self.log.warning(
                "counter write failed; entry left pending",
                counter=event.counter,
                entry_id=event.entry_id.decode(),
                deliveries=deliveries,
                error=error,
            )
            if deliveries >= self.s.max_deliveries:
                fields = self._original_fields(event.entry_id)
                final.append(Rejected(event.entry_id, fields, error))
        self._dead_letter(final)

    def _original_fields(self, entry_id: bytes) -> list[bytes]:
        raw = scripts.command(self.client, "XRANGE", self.s.stream, entry_id, entry_id)
        return [bytes(f) for f in raw[0][1]] if raw else []

    def _dead_letter(self, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        s = self.s
        moved = set(
            deadletter.move(self.client, s.stream, s.dead_letter, s.group, s.consumer, rejected)
        )
        self.stats.dead_lettered += len(moved)
        for item in rejected:
            if item.entry_id in moved:
                self.log.warning(
                    "entry dead-lettered",
                    entry_id=item.entry_id.decode(),
                    reason=item.reason,
                    dead_letter_stream=s.dead_letter,
                )

    # -- failures and shutdown -----------------------------------------------------------

    def _reset_after_error(self) -> None:
        """Forget what is in hand: it is still pending on the server, and ours; read our
        own pending list again from the start."""
        self._deferred = []
        self._backlog = b"0-0"
        self._backlog_is_redelivery = False
        self.reclaimer.restart()

    def _on_unavailable(self, exc: Exception) -> None:
        self._connection_failures += 1
        self._reset_after_error()
        delay = reconnect_delay(self._connection_failures)
        self.log.warning(
            "redis unavailable; retrying",
            error=str(exc),
            error_type=type(exc).__name__,
            attempt=self._connection_failures,
            retry_in_s=round(delay, 3),
        )
        sleep_unless(self.stopping, delay)

    def _hand_back(self) -> None:
        """On shutdown: entries kept in hand stay pending for the group. If this consumer has
        nothing pending at all, remove it from the group so names do not pile up."""
        self._deferred = []
        try:
            pending = scripts.command(
                self.client, "XPENDING", self.s.stream, self.s.group, "-", "+", 1, self.s.consumer
            )
            if not pending:
                scripts.command(
                    self.client,
                    "XGROUP",
                    "DELCONSUMER",
                    self.s.stream,
                    self.s.group,
                    self.s.consumer,
                )
        except redis.RedisError as exc:
            self.log.warning("could not tidy the consumer up on shutdown", error=str(exc))
        self.log.info("stopped", **self.stats.as_dict())


def sleep_unless(stopping: Callable[[], bool], seconds: float) -> None:
    """Sleep in short slices so that a stop request is seen within 50 ms."""
    end = time.monotonic() + seconds
    while not stopping():
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))
