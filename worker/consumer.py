"""The worker loop: upkeep, then one batch and those that follow it; back off; shut down.

Each turn: when due, a check that Redis cannot evict keys (each reclaim interval), the
settling of acknowledgements whose reply was lost, a little of the search for the markers of
entries found deleted, and the keep-ours claim of what is in hand. Then the turn's first
batch: a page of our own pending list (after a start or an error), else a page of the
reclaim sweep when due (entries idle for CLAIM_IDLE_MS, any consumer's), else new entries
(XREADGROUP >, blocking at most BLOCK_MS, less when something in hand is due); with it,
what in hand may be applied now. ``driver`` takes it through the stages of ``batch``, and
the new entries after it; each batch's outcome comes back here (``_conclude``): entries
given back are kept in hand (``hand``), the rest is counted and logged.

A crash anywhere leaves entries pending; the markers make their redelivery a no-op.
Connection errors and transient Redis errors (OOM, LOADING, READONLY...) drop what is in
hand (it is still pending, and ours), back off with jitter and start again from our own
pending list, without counting that as a redelivery. A maxmemory-policy that may evict keys
does the same, and the loop waits until it is noeviction again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import redis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config import Settings
from worker import counters, lag, replicas, scripts, stream
from worker.backoff import full_jitter, reconnect_delay
from worker.batch import Outcome, Parsed, Protocol, parse
from worker.connection import check_no_eviction, ensure_group, is_transient
from worker.deleted import DeletedEntries
from worker.driver import Driver
from worker.errors import EvictingRedis, GroupDeleted, ReplicasDisagree
from worker.hand import Entry, Hand
from worker.lanes import settle_s
from worker.metrics import Metrics
from worker.reclaim import Reclaimer
from worker.scripts import Pipe
from worker.stats import Stats
from worker.status import read_status
from worker.stream import Delivery

LEAVE = scripts.Script.load("leave_group")


class Consumer:
    """One replica's loop and the state it keeps between turns (hand, backlog, reclaimer,
    check-in clock), in one class as dramatiq keeps a broker's Redis state: every method is
    a screen or less, and the protocol's stages live outside it (driver, batch)."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        log: structlog.typing.FilteringBoundLogger,
        stopping: Callable[[], bool] = lambda: False,
        metrics: Metrics | None = None,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.s = settings
        self.log = log
        self.stopping = stopping
        self.stats = Stats()
        self.hand = Hand(settings.claim_idle_ms)
        self.reclaimer = Reclaimer(
            client, settings.stream, settings.group, settings.consumer, settings.claim_idle_ms
        )
        self.deleted = DeletedEntries(client, settings.stream, settings.lock_ttl_ms, log)
        """Pending entries deleted from the stream: were they counted? (a little a turn)"""
        self.pipe = Pipe(client)
        self.driver = Driver(self.pipe, Protocol(settings, log), settings)
        self._backlog: bytes | None = b"0-0"  # first read our own pending entries
        self._backlog_is_redelivery = True  # at start: our name's predecessor died
        self._connection_failures = 0
        self._stalled = 0
        self._rng = random.Random()
        self._next_check = 0.0
        """When to check Redis' maxmemory-policy again (each reclaim interval)."""
        self.terms = replicas.terms(settings.lock_ttl_ms, settings.claim_idle_ms)
        """What every replica of the group must agree on (``worker.replicas``)."""
        self.last_progress = time.monotonic()
        """When the loop last went round (``alive``)."""
        self.reachable = False
        self.group_ready = False
        self._lost_acks: dict[str, set[bytes]] = {}
        """Entries (per counter) acknowledged by a round trip whose reply was lost: their
        markers may have stayed (``_settle_lost_acks``)."""

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        last_report = time.monotonic()
        while not self.stopping():
            self.last_progress = time.monotonic()
            try:
                if not self.group_ready:
                    ensure_group(self.client, self.s.stream, self.s.group)
                    self.group_ready = True
                self.turn()
                self.reachable = True
                if self._connection_failures:
                    self.log.info("redis reachable again", after_failures=self._connection_failures)
                    self._connection_failures = 0
            except (RedisConnectionError, RedisTimeoutError) as exc:
                self._on_unavailable(exc)
            except GroupDeleted as exc:
                self.start_over()
                self.log.error("consumer group deleted; waiting for an operator", error=str(exc))
                sleep_unless(self.stopping, 5.0)
            except ReplicasDisagree as exc:
                self.start_over()
                self.reachable = True  # ready: a rollout must go on, so the old ones go
                self.log.error(
                    "replicas of this group work on other terms; not applying until they agree",
                    ours=exc.ours,
                    theirs=exc.others,
                )
                sleep_unless(self.stopping, min(5.0, self.reclaimer.interval))
            except EvictingRedis as exc:
                self.start_over()
                self.log.error("redis may evict keys; not applying until it cannot", error=str(exc))
                sleep_unless(self.stopping, min(5.0, self.reclaimer.interval))
            except ResponseError as exc:
                if is_transient(exc):
                    self._on_unavailable(exc)
                elif str(exc).startswith("NOGROUP"):
                    self.log.warning("consumer group missing", error=str(exc))
                    self.start_over()
                    self.group_ready = False
                else:
                    raise
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                self.log.info("progress", **self.stats.as_dict())
        self.hand_back()

    def turn(self) -> None:
        """One turn: upkeep when due, then the turn's first batch and those after it."""
        self._upkeep()
        first, read, more = self._first_batch()
        if not (first.entries or first.rejected or first.gone):
            return
        until = self.reclaimer.next_sweep
        outcomes = self.driver.drive(first, read, more, until, self.stopping)
        progress, error = 0, None
        for outcome in outcomes:
            progress += self._conclude(outcome)
            error = error or outcome.error or (outcome.refused and ResponseError(outcome.refused))
        if error:
            raise error  # after the batches in flight were finished: back off (``run``)
        self._stall_unless(progress)

    def _upkeep(self) -> None:
        """What is due before the next batch: the checks of each reclaim interval, lost
        acknowledgements, the deleted entries' search, the keep-ours claim."""
        if time.monotonic() >= self._next_check:
            self._check_in()
            self._next_check = time.monotonic() + self.reclaimer.interval
        if self._lost_acks:
            self._settle_lost_acks()
        if self.deleted.busy():
            self.deleted.walk_and_report()
        self._keep_ours()

    def _check_in(self) -> None:
        """Each reclaim interval: Redis cannot evict keys (else EvictingRedis), the
        heartbeat, every live replica on our terms (else ReplicasDisagree: the loop waits,
        ``run``), Redis' lag right, the metrics' gauges."""
        s = self.s
        check_no_eviction(self.client)
        keep, window = s.claim_idle_ms * 10, replicas.live_window_ms(s.claim_idle_ms)
        live = replicas.beat(self.client, s.stream, s.consumer, keep, self.terms, window)
        cap = lag.COUNT_CAP if self.metrics is not None else 0  # without metrics: repair only
        found = lag.group_lag(self.client, s.stream, s.group, repair=True, cap=cap)
        if found is not None and found.repaired:
            self.log.warning("redis reported a wrong lag for the drained group; repaired")
        if self.metrics is not None and (state := read_status(self.client, s, found)) is not None:
            self.metrics.redis_state(state)
        others = {name: terms for name, terms in live.items() if terms != self.terms}
        if others:
            raise ReplicasDisagree(others, self.terms)

    def _first_batch(self) -> tuple[Parsed, int, bool]:
        """The turn's first batch: a page of our backlog, else a reclaim page when due, else
        new entries; with what in hand is ready. Also how many entries were read, and
        whether new entries may follow it in this turn."""
        room = self.s.batch_size - len(self.hand.waiting)  # held entries wait apart
        deliveries: list[Delivery] = []
        unknown: set[bytes] = set()
        more = False
        if self._backlog is not None:
            deliveries, unknown = self._read_backlog()
        if not deliveries and self._backlog is None and self.reclaimer.due() and room > 0:
            deliveries = self._claim(room)
            more = not self.reclaimer.due()
        if not deliveries and self._backlog is None and room > 0:
            block = None if self.hand.any_ready(time.monotonic()) else self._block_ms()
            s = self.s
            deliveries = stream.read_new(self.client, s.stream, s.group, s.consumer, room, block)
            more = True
        first = parse(deliveries)
        if unknown:
            self._hold([e for e in first.entries if e.entry_id in unknown])
            first = first._replace(entries=[e for e in first.entries if e.entry_id not in unknown])
            self._keep_ours()  # at once: our backlog may have been idle through an outage
        first.entries.extend(self.hand.take_ready(time.monotonic()))
        return first, len(deliveries), more

    def _claim(self, room: int) -> list[Delivery]:
        """A page of the reclaim sweep: entries idle for CLAIM_IDLE_MS, now ours. Those
        already in hand are updated there (now they need their previous owner's lane)."""
        result = self.reclaimer.claim(room)
        self.deleted.found(result.deleted)
        if result.pruned:
            self.log.info(
                "removed idle consumers with nothing pending from the group",
                consumers=[c.decode(errors="replace") for c in result.pruned],
            )
        claimed = self.hand.claimed(result.claimed)
        if claimed:
            self.stats.reclaimed += len(claimed)
            if self.metrics is not None:
                self.metrics.claimed.inc(len(claimed))
            self.log.info("claimed idle entries", count=len(claimed))
        return claimed

    def _settle_lost_acks(self) -> None:
        """After a lost connection: the XACK of a round trip whose reply was lost may have
        run, and the removal of the entries' markers after it not (Redis had read only
        part of the round). Those entries no longer pending were acknowledged: their
        markers expire one lock TTL from now. Those still pending come back with our own
        pending list (or another replica's claim), and are finished as usual."""
        s = self.s
        ids = [i for acked in self._lost_acks.values() for i in acked]
        still = stream.delivery_counts(self.client, s.stream, s.group, ids)
        done = {n: [i for i in acked if i not in still] for n, acked in self._lost_acks.items()}
        counters.expire_soon(self.client, s.stream.encode(), done, s.lock_ttl_ms)
        self._lost_acks = {}

    def _conclude(self, outcome: Outcome) -> int:
        """After a batch: count it, keep what it gave back in hand, report. Returns how
        many entries it moved on (counted, found counted, dead-lettered, failed)."""
        stats = self.stats
        stats.applied += outcome.applied
        stats.duplicates += outcome.duplicates
        stats.lock_busy += outcome.busy_counters
        stats.lock_lost += outcome.lock_lost
        stats.write_failures += outcome.write_failures
        stats.dead_lettered += len(outcome.dead_lettered)
        if self.metrics is not None:
            self.metrics.batch(outcome)
        for item in outcome.dead_lettered:
            self.log.warning(
                "entry dead-lettered",
                entry_id=item.entry_id.decode(),
                reason=item.reason,
                dead_letter_stream=self.s.dead_letter,
            )
        for entry, error in outcome.failed:
            self.log.warning(
                "counter write failed; entry left pending for a retry",
                counter=entry.event.counter,
                entry_id=entry.entry_id.decode(),
                deliveries=entry.deliveries,
                error=error,
            )
        self.deleted.found(outcome.deleted)
        self.hand.wait(outcome.busy + outcome.lost)
        self._hold(outcome.held)
        self._keep_ours()  # at once for entries that came into hand: they may have waited
        self.log.debug(
            "batch",
            read=outcome.read,
            applied=outcome.applied,
            duplicates=outcome.duplicates,
            dead_lettered=len(outcome.dead_lettered),
            failed=len(outcome.failed),
            in_hand=len(self.hand),
            lock_wait_ms=round(outcome.lock_wait_ms, 2),
            ms=round((time.perf_counter() - outcome.started) * 1000, 2),
        )
        moved = outcome.applied + outcome.duplicates + len(outcome.dead_lettered)
        return moved + len(outcome.failed)

    def _stall_unless(self, progress: int) -> None:
        """Entries wait in hand and nothing moved (every lane busy): holding no lock, wait a
        little rather than spin on Redis."""
        if self.hand.waiting and not progress:
            self._stalled += 1
            sleep_unless(self.stopping, full_jitter(self._stalled, 0.001, 0.05, self._rng))
        else:
            self._stalled = 0

    def _hold(self, entries: list[Entry]) -> None:
        """Keep entries in hand, unapplied, until every lock taken before now has expired.
        Called right after the reply that showed their past owners are unknown."""
        if entries:
            hold_s = settle_s(self.s.lock_ttl_ms)
            self.hand.hold(entries, time.monotonic() + hold_s)
            self.log.info(
                "entries held until every lock taken before them has expired",
                count=len(entries),
                hold_ms=round(hold_s * 1000),
            )

    def _keep_ours(self) -> None:
        """When due, claim what is in hand ours again (claim_own.lua: no delivery counted,
        only entries still pending for us), before it looks idle long enough for another
        replica to claim it. One delivered again meanwhile was claimed away and back: it is
        held anew."""
        due = self.hand.keep_ours_due()
        if due is None or time.monotonic() < due:
            return
        s = self.s
        now = time.monotonic()  # before the call: the idle times are reset after it
        kept = stream.claim_own(self.client, s.stream, s.group, s.consumer, self.hand.ids())
        self.deleted.found(kept.deleted)
        self._hold(self.hand.kept(kept.counts, now))

    def _read_backlog(self) -> tuple[list[Delivery], set[bytes]]:
        """A page of our own pending list (after a start or an error), and the ids among it
        whose past owners we do not know: delivered more than once before this read, they
        may have been claimed to our name (by an earlier process of it, or by a claim whose
        reply was lost) from a replica that still holds its lane. Those are held for
        LOCK_TTL_MS (``_hold``), by when its lock has expired. An entry delivered once was
        only ever pending for our name: our lane covers it."""
        s = self.s
        assert self._backlog is not None
        read, once = stream.refetch_own_pending, 1
        if self._backlog_is_redelivery:
            read, once = stream.read_own_pending, 2  # this read counted one more delivery
        batch = read(self.client, s.stream, s.group, s.consumer, self._backlog, s.batch_size)
        self._backlog = batch[-1].entry_id if batch else None
        return batch, {d.entry_id for d in batch if d.deliveries > once}

    def _block_ms(self) -> int:
        """BLOCK_MS, or less: until the next reclaim sweep, the keep-ours claim of what is
        in hand, or the first held entry is due."""
        wake = [self.reclaimer.next_sweep]
        if self.deleted.busy():
            wake.append(0.0)  # the search goes on a little each turn
        for due in (self.hand.keep_ours_due(), self.hand.next_due()):
            if due is not None:
                wake.append(due)
        due = min(wake) - time.monotonic()
        return max(1, min(self.s.block_ms, int(due * 1000) + 1))

    # -- failures and shutdown -----------------------------------------------------------

    def start_over(self) -> None:
        """After an error: forget what is in hand (it is still pending on the server, and
        ours) and read our own pending list again from the start. Keep what a lost round
        trip acknowledged, to settle it (``_settle_lost_acks``)."""
        for name, _lanes, ids in self.pipe.lost_acks:
            self._lost_acks.setdefault(name, set()).update(ids)
        self.pipe.lost_acks.clear()
        self.hand.drop()
        self._backlog = b"0-0"
        self._backlog_is_redelivery = False
        self._next_check = 0.0
        self.reclaimer.restart()
        self.deleted.restart()

    def alive(self) -> tuple[bool, str]:
        """Liveness (``/healthz``): the loop went round lately. A turn waits at most a read
        (BLOCK_MS), a command (its socket timeout, BLOCK_MS + 10 s), busy locks (LOCK_WAIT_MS)
        or a backoff (5 s)."""
        quiet = time.monotonic() - self.last_progress
        limit = 2 * ((self.s.block_ms + self.s.lock_wait_ms) / 1000 + 10) + 10
        return quiet < limit, f"the loop went round {quiet:.1f} s ago (limit {limit:.0f} s)"

    def ready(self) -> tuple[bool, str]:
        """Readiness (``/readyz``): the last turn reached Redis, and the group exists."""
        if not self.reachable:
            return False, "redis is not reachable"
        if not self.group_ready:
            return False, f"consumer group {self.s.group!r} is missing"
        return True, "connected, group in place"

    def _on_unavailable(self, exc: Exception) -> None:
        self.reachable = False
        if self._connection_failures == 0 and self.metrics is not None:
            self.metrics.reconnects.inc()
        self._connection_failures += 1
        self.start_over()
        delay = reconnect_delay(self._connection_failures)
        self.log.warning(
            "redis unavailable; retrying",
            error=str(exc),
            error_type=type(exc).__name__,
            attempt=self._connection_failures,
            retry_in_s=round(delay, 3),
        )
        sleep_unless(self.stopping, delay)

    def hand_back(self) -> None:
        """On shutdown: entries kept in hand stay pending for the group. If this consumer has
        nothing pending at all, remove it from the group so names do not pile up."""
        self.hand.drop()
        try:
            stream = self.s.stream
            keys = [stream, replicas.replicas_key(stream), replicas.terms_key(stream)]
            LEAVE(self.client, keys, [self.s.group, self.s.consumer])
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
