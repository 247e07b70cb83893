"""The worker loop: reclaim, read, dead-letter, apply (``batch``), back off, shut down.

Each turn: when due (each reclaim interval), a check that Redis cannot evict keys and a
page of the reclaim sweep (entries idle for CLAIM_IDLE_MS, any consumer's); a little of the
search for the markers of entries found deleted, if any; then a read: first this consumer's
own pending list (after a start or an error), then new entries (XREADGROUP >, blocking at
most BLOCK_MS, less when something in hand is due). Each batch is parsed; invalid entries
and entries delivered more than MAX_DELIVERIES times go to the dead-letter stream (atomic
with their XACK); the rest go through ``batch.BatchApplier``. Entries whose lock stayed
busy, or whose lock was lost, are kept in hand for the next turn, and claimed ours again
every CLAIM_IDLE_MS / 3 so that they never look idle to other replicas.

A crash anywhere leaves entries pending; the markers make their redelivery a no-op.
Connection errors and transient Redis errors (OOM, LOADING, READONLY...) drop what is in
hand (it is still pending, and ours), back off with jitter and start again from our own
pending list, without counting that as a redelivery. A maxmemory-policy that may evict keys
does the same, and the loop waits until it is noeviction again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Container

import redis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config import Settings
from worker import counters, deadletter, events, scripts, stream
from worker.backoff import full_jitter, reconnect_delay
from worker.batch import BatchApplier
from worker.connection import check_no_eviction, ensure_group, is_transient
from worker.deadletter import Rejected
from worker.deleted import DeletedEntries, Verdict
from worker.errors import EvictingRedis, GroupDeleted, InvalidEvent
from worker.events import Event
from worker.flow import Flow, Job
from worker.lanes import settle_s
from worker.outcome import Stats
from worker.reclaim import Reclaimer
from worker.scripts import Pipe
from worker.stream import Delivery

LEAVE = scripts.Script.load("leave_group")


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
        self.reclaimer = Reclaimer(
            client, settings.stream, settings.group, settings.consumer, settings.claim_idle_ms
        )
        self.stats = Stats()
        self.deleted = DeletedEntries(client, settings.stream, settings.lock_ttl_ms)
        """Pending entries deleted from the stream: were they counted? (one page a turn)"""
        self.pipe = Pipe(client)
        self.applier = BatchApplier(client, settings, log, self.stats, stopping, self.pipe)
        self.flow = Flow(
            self.pipe,
            self.applier,
            stream.read_call(
                settings.stream, settings.group, settings.consumer, settings.batch_size, None
            ),
            self.prepare,
            self.conclude,
            keep_reading=lambda: not self.stopping() and not self.reclaimer.due(),
            clean=lambda: not self._deferred,
        )
        self._deferred: list[Event] = []
        self._held: list[Event] = []
        """Entries not to apply before their ``not_before`` (kept in hand, still pending)."""
        self._claim_now = False
        """Claim what is in hand on the next keep-ours check, not CLAIM_IDLE_MS / 3 later."""
        self._backlog: bytes | None = b"0-0"  # first read our own pending entries
        self._backlog_is_redelivery = True  # at start: our name's predecessor died
        self._connection_failures = 0
        self._stalled = 0
        self._rng = random.Random()
        self._deferred_since: float | None = None
        self._next_server_check = 0.0
        """When to check Redis' maxmemory-policy again (each reclaim interval)."""
        self._lost_acks: dict[str, set[bytes]] = {}
        """Entries (per counter) acknowledged by a round trip whose reply was lost: their
        markers may have stayed (``_settle_lost_acks``)."""

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        last_report = time.monotonic()
        group_ready = False
        while not self.stopping():
            try:
                if not group_ready:
                    ensure_group(self.client, self.s.stream, self.s.group)
                    group_ready = True
                self.step()
                if self._connection_failures:
                    self.log.info("redis reachable again", after_failures=self._connection_failures)
                    self._connection_failures = 0
            except (RedisConnectionError, RedisTimeoutError) as exc:
                self._on_unavailable(exc)
            except GroupDeleted as exc:
                self._reset_after_error()
                self.log.error("consumer group deleted; waiting for an operator", error=str(exc))
                sleep_unless(self.stopping, 5.0)
            except EvictingRedis as exc:
                self._reset_after_error()
                self.log.error("redis may evict keys; not applying until it cannot", error=str(exc))
                sleep_unless(self.stopping, min(5.0, self.reclaimer.interval))
            except ResponseError as exc:
                if is_transient(exc):
                    self._on_unavailable(exc)
                elif str(exc).startswith("NOGROUP"):
                    self.log.warning("consumer group missing", error=str(exc))
                    self._reset_after_error()
                    group_ready = False
                else:
                    raise
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                self.log.info("progress", **self.stats.as_dict())
        self._hand_back()

    def step(self) -> None:
        """One turn: a reclaim page when due, then a read, each processed in full."""
        s = self.s
        if time.monotonic() >= self._next_server_check:
            check_no_eviction(self.client)  # raises EvictingRedis: the loop waits
            self._next_server_check = time.monotonic() + self.reclaimer.interval
        if self._lost_acks:
            self._settle_lost_acks()
        if self.deleted.busy():
            self._report(self._search_deleted())
        if self._held:
            self._keep_deferred_ours()  # also while the stream is idle and nothing concludes
            now = time.monotonic()
            ready = [e for e in self._held if e.not_before <= now]
            if ready:
                self._held = [e for e in self._held if e.not_before > now]
                self._deferred += ready
        room = s.batch_size - len(self._deferred)
        # Our own pending list first (after a start or an error): XAUTOCLAIM would count
        # our own entries as redelivered.
        if self._backlog is None and self.reclaimer.due() and room > 0:
            result = self.reclaimer.claim(room)
            self._forget_deleted(result.deleted)
            if result.pruned:
                self.log.info(
                    "removed idle consumers with nothing pending from the group",
                    consumers=[c.decode(errors="replace") for c in result.pruned],
                )
            in_hand = {h.entry_id: h for h in (*self._deferred, *self._held)}
            for d in result.claimed:
                event = in_hand.get(d.entry_id)
                if event is not None:  # claimed back while in hand: it is now theirs to lock
                    event.owner, event.deliveries = d.owner, d.deliveries
            claimed = [d for d in result.claimed if d.entry_id not in in_hand]
            if claimed:
                self.stats.reclaimed += len(claimed)
                self.log.info("claimed idle entries", count=len(claimed))
                self.process(claimed)
                room = self.s.batch_size - len(self._deferred)
        if room > 0 and self._backlog is None and not self._deferred:
            # The common case: new entries, nothing kept in hand. Batches back to back.
            block = self._block_ms()
            batch = stream.read_new(self.client, s.stream, s.group, s.consumer, room, block)
            refused = self.flow.run(batch) if batch else ""
            if refused:
                raise ResponseError(refused)
            return
        if self._backlog is not None:
            backlog, unknown = self._read_backlog()
            if backlog:
                self.process(backlog, hold=unknown)
                return
        self.process(self._read(room) if room > 0 else [])

    def _read_backlog(self) -> tuple[list[Delivery], set[bytes]]:
        """A page of our own pending list (after a start or an error), and the ids among it
        whose past owners we do not know: delivered more than once before this read, they
        may have been claimed to our name (by an earlier process of it, or by a claim whose
        reply was lost) from a replica that still holds its lane. Those are held for
        LOCK_TTL_MS (``process``), by when its lock has expired. An entry delivered once was
        only ever pending for our name: our lane covers it. Held entries do not use up the
        batch's room, so the whole backlog is read at once and waits once."""
        s = self.s
        assert self._backlog is not None
        read, once = stream.refetch_own_pending, 1
        if self._backlog_is_redelivery:
            read, once = stream.read_own_pending, 2  # this read counted one more delivery
        batch = read(self.client, s.stream, s.group, s.consumer, self._backlog, s.batch_size)
        if batch:
            self._backlog = batch[-1].entry_id
        else:
            self._backlog = None
        return batch, {d.entry_id for d in batch if d.deliveries > once}

    def _read(self, room: int) -> list[Delivery]:
        s = self.s
        block = None if self._deferred else self._block_ms()
        return stream.read_new(self.client, s.stream, s.group, s.consumer, room, block)

    def _block_ms(self) -> int:
        """BLOCK_MS, or less: until the next reclaim sweep, the first held entry is due or
        the entries in hand must be claimed ours again (else they would look idle)."""
        wake = [self.reclaimer.next_sweep]
        if self.deleted.busy():
            wake.append(0.0)  # the search goes on a little each turn
        keep = self._keep_ours_due()
        if keep is not None:
            wake.append(keep)
        wake += (e.not_before for e in self._held)
        due = min(wake) - time.monotonic()
        return max(1, min(self.s.block_ms, int(due * 1000) + 1))

    # -- one batch -----------------------------------------------------------------------

    def process(self, batch: list[Delivery], *, hold: Container[bytes] = ()) -> None:
        """One batch on its own (claimed entries, our backlog, entries kept in hand). The
        entries of ``hold`` wait LOCK_TTL_MS from now (``_read_backlog``)."""
        job = self.prepare(batch, with_deferred=True)
        if hold:
            self._hold([e for e in job.valid if e.entry_id in hold])
            job.valid = [e for e in job.valid if e.entry_id not in hold]
        if job.valid:
            job.outcome = self.applier.apply_all(job.valid)
        refused = self.conclude(job)
        if refused:
            raise ResponseError(refused)

    def prepare(self, batch: list[Delivery], *, with_deferred: bool = False) -> Job:
        """Parse a batch: its valid events (after the ones kept in hand, if asked) and the
        entries to dead-letter."""
        job = Job(batch, time.perf_counter())
        if with_deferred:
            job.valid, self._deferred = self._deferred, []
        valid, rejected = job.valid, job.rejected
        in_hand = {e.entry_id for e in valid}
        if self._held:
            in_hand.update(e.entry_id for e in self._held)
        for item in batch:
            if item.entry_id in in_hand:
                continue  # already in hand (claimed and read again): once is enough
            in_hand.add(item.entry_id)
            if item.fields is None:
                job.gone.append(item.entry_id)  # deleted from the stream while pending
            else:  # valid entries delivered too often are probed, then dead-lettered (batch)
                try:
                    event = events.parse(item.entry_id, item.fields)
                    event.deliveries = item.deliveries
                    event.owner = item.owner
                    valid.append(event)
                except InvalidEvent as exc:
                    rejected.append(Rejected(item.entry_id, item.fields, exc.reason))
        return job

    def conclude(self, job: Job, stall: bool = True) -> str:
        """After a batch: dead-letter what is left to, keep busy and lost entries in hand,
        report; if nothing moved and ``stall``, wait a little (holding no lock). Returns the
        error of a transient refusal (e.g. OOM) to back off for, or ''."""
        self._dead_letter(job.rejected)
        if job.gone:
            scripts.command(self.client, "XACK", self.s.stream, self.s.group, *job.gone)
        outcome = job.outcome
        self._forget_deleted(job.gone + outcome.deleted)
        # Busy or lost: keep them in hand for the next turn (they stay pending, ours), and
        # claim them ours at once: they may have waited LOCK_WAIT_MS already.
        self._deferred += outcome.busy + outcome.lost
        self._hold(outcome.held)
        if outcome.busy or outcome.lost or outcome.held:
            self._claim_now = True
        self._keep_deferred_ours()
        progress = outcome.applied + outcome.duplicates + len(job.rejected) + len(outcome.failed)
        if self._deferred and not progress and stall:
            # Nothing moved (every lock busy): do not spin on Redis; holding no lock, wait.
            self._stalled += 1
            sleep_unless(self.stopping, full_jitter(self._stalled, 0.001, 0.05, self._rng))
        else:
            self._stalled = 0
        self._after_failures(outcome.failed)
        if job.batch or job.valid:
            self.log.debug(
                "batch",
                read=len(job.batch),
                applied=outcome.applied,
                duplicates=outcome.duplicates,
                rejected=len(job.rejected),
                failed=len(outcome.failed),
                deferred=len(self._deferred),
                lock_wait_ms=round(outcome.lock_wait_ms, 2),
                ms=round((time.perf_counter() - job.started) * 1000, 2),
            )
        return outcome.refused

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

    def _forget_deleted(self, ids: list[bytes]) -> None:
        """Pending entries found deleted from the stream are out of the pending list (the
        claim dropped them, or we acknowledged them): look for their markers, to tell
        whether they were counted (``worker.deleted``)."""
        if not ids:
            return
        self.log.info(
            "pending entries were deleted from the stream; looking for their markers to "
            "tell whether they were counted",
            ids=[i.decode() for i in ids],
        )
        left_out = self.deleted.add(ids)
        if left_out:
            self.log.warning(
                "too many deleted entries to look for: whether these were counted is unknown",
                count=len(left_out),
                ids=[i.decode() for i in left_out[:10]],
            )

    def _search_deleted(self) -> list[Verdict]:
        """A little more of the search (``worker.deleted``); it gives up on an error that
        will not pass (say, SCAN refused by an ACL): it must not stop the counting."""
        try:
            return self.deleted.step()
        except ResponseError as exc:
            if is_transient(exc):
                raise
            ids = self.deleted.give_up()
            self.log.warning(
                "could not look for the markers of deleted entries: whether they were "
                "counted is unknown",
                error=str(exc),
                count=len(ids),
                ids=[i.decode() for i in ids[:10]],
            )
            return []

    def _report(self, verdicts: list[Verdict]) -> None:
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

    def _hold(self, waiting: list[Event]) -> None:
        """Keep entries in hand, unapplied, until every lock taken before now has expired.
        Called right after the reply that showed their past owners are unknown."""
        if waiting:
            until = time.monotonic() + settle_s(self.s.lock_ttl_ms)
            for event in waiting:
                event.not_before = until
            self._held += waiting
            self.log.info(
                "entries held until every lock taken before them has expired",
                count=len(waiting),
                hold_ms=round(settle_s(self.s.lock_ttl_ms) * 1000),
            )

    def _keep_deferred_ours(self) -> None:
        """Entries kept in hand across turns (their lock stays busy, or they are held) are
        not touched by Redis meanwhile: before they look idle long enough for another replica
        to claim them (and count a delivery), claim them to ourselves again (claim_own.lua:
        no delivery counted, and only entries still pending for us). Those no longer ours
        were finished or claimed by someone else: dropped. One delivered again meanwhile was
        claimed away and back: it is held (see ``batch``)."""
        if not self._deferred and not self._held:
            self._deferred_since = None
            return
        now = time.monotonic()
        due = self._keep_ours_due()
        if due is None or now < due:
            return
        self._claim_now = False
        s = self.s
        ids = [e.entry_id for e in (*self._deferred, *self._held)]
        kept = stream.claim_own(self.client, s.stream, s.group, s.consumer, ids)
        self._forget_deleted(kept.deleted)
        still = kept.counts
        in_hand = [e for e in (*self._deferred, *self._held) if e.entry_id in still]
        again = [e for e in in_hand if still[e.entry_id] > e.deliveries]  # away and back
        for event in again:
            event.deliveries = still[event.entry_id]
        keep = still.keys() - {e.entry_id for e in again}
        self._deferred = [e for e in self._deferred if e.entry_id in keep]
        self._held = [e for e in self._held if e.entry_id in keep]
        self._hold(again)  # (held ones wait anew, from this reply)
        self._deferred_since = now

    def _keep_ours_due(self) -> float | None:
        """When the entries in hand must next be claimed ours (monotonic), if any are in hand:
        every CLAIM_IDLE_MS / 3. With LOCK_WAIT_MS <= CLAIM_IDLE_MS / 4 (settings), no entry
        in hand stays untouched for CLAIM_IDLE_MS (docs/settings.md)."""
        if not self._deferred and not self._held:
            return None
        if self._claim_now or self._deferred_since is None:
            return 0.0  # at once: new in hand (after a batch's wait), or after an outage
        return self._deferred_since + self.s.claim_idle_ms / 3000

    def _after_failures(self, failed: list[tuple[Event, str]]) -> None:
        """A failed write leaves the entry pending (retried after CLAIM_IDLE_MS); from its
        MAX_DELIVERIES-th delivery on it is dead-lettered, with Redis' error as the reason."""
        most = self.s.max_deliveries
        for event, error in failed:
            if event.deliveries < most:
                self.log.warning(
                    "counter write failed; entry left pending for a retry",
                    counter=event.counter,
                    entry_id=event.entry_id.decode(),
                    deliveries=event.deliveries,
                    error=error,
                )
        last = [(event, error) for event, error in failed if event.deliveries >= most]
        if last:
            fields = stream.fetch_fields(self.client, self.s.stream, [e.entry_id for e, _ in last])
            self._dead_letter([Rejected(e.entry_id, fields[e.entry_id] or [], r) for e, r in last])

    def _dead_letter(self, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        s = self.s
        moved = set(
            deadletter.move(self.pipe, s.stream, s.dead_letter, s.group, s.consumer, rejected)
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
        own pending list again from the start. (The time of the last keep-ours claim stays:
        the same entries come back, and must not look idle to other replicas meanwhile.)
        Keep what a lost round trip acknowledged, to settle it (``_settle_lost_acks``)."""
        for name, _lanes, ids in self.pipe.lost_acks:
            self._lost_acks.setdefault(name, set()).update(ids)
        self.pipe.lost_acks.clear()
        self._deferred = []
        self._held = []
        self._claim_now = True  # what comes back may have been idle through the outage
        self._backlog = b"0-0"
        self._backlog_is_redelivery = False
        self._next_server_check = 0.0
        self.reclaimer.restart()
        self.deleted.restart()

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
        self._held = []
        try:
            call = scripts.Call.eval(LEAVE, [self.s.stream], [self.s.group, self.s.consumer])
            (result,) = scripts.run(self.client, [call])
            if isinstance(result, Exception):
                raise result
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
