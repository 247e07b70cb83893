"""One batch through the fenced exactly-once protocol, one stage per round trip.

    stage       the round trip (Redis runs its calls in the order sent)
    parse       (no round trip) deliveries -> entries to apply, entries to dead-letter,
                entries deleted from the stream
    take lanes  lock_acquire.lua: every lane the entries need (docs/design-lock-lanes.md,
                rule A), one fresh token; then XPENDING of our pending list: the confirm
    [confirm]   only if that XPENDING page was full: claim_own.lua of the entries it missed
    write       counter_apply.lua: per counter whose every lane we took, fenced by the token:
                skip entries that have a marker, INCRBY the exact sum, add markers; again
                for a failed sum's entries one by one
    finish      XACK what was written or found written; counter_finish.lua: release the
                lanes, remove those markers (or cut them short if a lane was lost, rule B);
                deadletter.lua: invalid entries and worn-out ones, atomically with their
                XACK; XACK of entries deleted from the stream

Each stage is a function from values to values: a ``Round`` to send, or what its replies
decided. ``Batch`` strings them together; a driver (``worker.driver``) sends its rounds and
hands back the replies. While Redis runs a round, ``Batch.plan_ahead`` builds the next round as
if all goes well (every lane taken, every entry confirmed, every write done), and the batch
uses it when it did: this process and Redis then work at the same time.

Entries of counters whose lanes were busy, whose lane was lost before the write, or
delivered again since we read them (to hold) are not applied: the outcome gives them back.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import structlog

from config import Settings
from worker import counters, deadletter, events, stream
from worker.counters import Write, Written
from worker.deadletter import Rejected
from worker.errors import InvalidEvent
from worker.events import Event
from worker.hand import Entry
from worker.lanes import Turns, lanes_of
from worker.lock import Locks
from worker.scripts import Call, Round
from worker.stream import Delivery

Lanes = dict[str, list[str]]
"""Per counter, the lane keys its entries need (ours first)."""

MAX_WRITE = 1000
"""Events of one counter in one script call: Lua unpacks at most ~8,000 values into one
command, and a call's markers are 2 per event (entry id, event_id) plus their scores."""


class Protocol:
    """What every batch of one replica shares: names, settings, lock tokens, turns."""

    def __init__(self, settings: Settings, log: structlog.typing.FilteringBoundLogger) -> None:
        self.s = settings
        self.me = settings.consumer
        self.stream_key = settings.stream.encode()
        self.locks = Locks(settings.lock_ttl_ms)
        self.turns = Turns()
        self.log = log


@dataclass(slots=True)
class Outcome:
    """What one batch did, and what it gives back."""

    read: int = 0
    started: float = field(default_factory=time.perf_counter)
    applied: int = 0
    duplicates: int = 0
    busy: list[Entry] = field(default_factory=list)
    """Their counter's lanes were busy: not tried."""
    busy_counters: int = 0
    lost: list[Entry] = field(default_factory=list)
    """Not written: a lane was lost, or Redis refused the write for now (``refused``)."""
    held: list[Entry] = field(default_factory=list)
    """Delivered again since they were read: to hold before applying (rule D)."""
    failed: list[tuple[Entry, str]] = field(default_factory=list)
    """The write failed (Redis' error); left pending for a retry."""
    dead_lettered: list[Rejected] = field(default_factory=list)
    deleted: list[bytes] = field(default_factory=list)
    """Pending entries found deleted from the stream: off the pending list, not applied."""
    lock_lost: int = 0
    """Entries whose write fencing refused (a lane expired before it)."""
    write_failures: int = 0
    refused: str = ""
    """A transient Redis error that refused a write (e.g. OOM): back off after the batch."""
    error: Exception | None = None
    """An error reply of the finish round, to raise once the outcome is counted."""
    lock_wait_ms: float = 0.0

    @property
    def clean(self) -> bool:
        """Nothing given back to wait in hand, and no error: new batches may follow."""
        return not (self.busy or self.lost or self.refused or self.error)


class Parsed(NamedTuple):
    entries: list[Entry]
    rejected: list[Rejected]
    gone: list[bytes]
    """Pending entries of ours deleted from the stream: nothing to apply."""


def parse(deliveries: Sequence[Delivery]) -> Parsed:
    """Stage parse: deliveries -> entries, the invalid ones (to dead-letter), the deleted;
    each entry once."""
    parsed = Parsed([], [], [])
    seen: set[bytes] = set()
    for d in deliveries:
        if d.entry_id in seen:
            continue  # once is enough: applying an entry twice in one call counts it twice
        seen.add(d.entry_id)
        if d.fields is None:
            parsed.gone.append(d.entry_id)
            continue
        try:
            event = events.parse(d.entry_id, d.fields)
        except InvalidEvent as exc:
            parsed.rejected.append(Rejected(d.entry_id, d.fields, exc.reason))
        else:
            parsed.entries.append(Entry(d.entry_id, event, d.deliveries, d.owner))
    return parsed


def parse_read(reply: Any) -> Parsed:
    """``parse`` of a read of new entries (XREADGROUP >): each delivered once, no owner."""
    if not reply:
        return Parsed([], [], [])
    entries: list[Entry] = []
    rejected: list[Rejected] = []
    for entry_id, fields in reply[0][1]:
        try:
            entries.append(Entry(entry_id, events.parse(entry_id, fields), 1))
        except InvalidEvent as exc:
            rejected.append(Rejected(entry_id, fields, exc.reason))
    return Parsed(entries, rejected, [])


# -- the stages: values in, values out ---------------------------------------------------


def take_lanes(
    p: Protocol, lanes: Lanes, others: Lanes, token: str, count: int
) -> tuple[Round, list[str]]:
    """Stage take lanes: the lock call for every lane, then the confirm (XPENDING); and
    the lane keys in the lock call's order."""
    keys, waiters = p.turns.order(lanes, others, p.me)
    lock = p.locks.acquire_call(keys, token, waiters=waiters, me=p.me).packed()
    confirm = stream.confirm_call(p.s.stream, p.s.group, p.me, count)
    return Round("take_lanes", [lock, confirm]), keys


class Taken(NamedTuple):
    locked: list[str]
    """Counters whose every lane we took."""
    busy: list[str]
    partial: list[str]
    """Busy counters of which we took some lanes: released at the finish."""


def lanes_taken(p: Protocol, keys: Sequence[str], reply: list[int], lanes: Lanes) -> Taken:
    if reply.count(1) == len(reply):
        p.turns.taken(keys, None)
        return Taken(list(lanes), [], [])
    got = {k for k, ok in zip(keys, reply, strict=True) if ok == 1}
    p.turns.taken(keys, got)
    taken = Taken([], [], [])
    for name, its in lanes.items():
        if all(k in got for k in its):
            taken.locked.append(name)
        else:
            taken.busy.append(name)
            if any(k in got for k in its):
                taken.partial.append(name)
    return taken


def still_ours(
    by_counter: dict[str, list[Entry]], pending: Mapping[bytes, int]
) -> tuple[dict[str, list[Entry]], list[Entry], list[bytes]]:
    """Stage confirm: of each counter's entries, those still pending for us as we read them;
    those delivered again since (claimed away and back: to hold, rule D); the ids no longer
    pending (finished by another replica, or deleted)."""
    again: list[Entry] = []
    missing: list[bytes] = []
    for items in by_counter.values():
        for e in items:
            times = pending.get(e.entry_id)
            if times is None:
                missing.append(e.entry_id)
            elif times > e.deliveries:
                again.append(e._replace(deliveries=times))
    if not missing and not again:
        return by_counter, again, missing  # the common case
    left = {e.entry_id for e in again}.union(missing)
    ours = {n: [e for e in items if e.entry_id not in left] for n, items in by_counter.items()}
    return ours, again, missing


class Plan(NamedTuple):
    """The writes of one apply call, and the events that ride on one of them."""

    writes: list[Write]
    followers: dict[bytes, list[Entry]]
    """A repeated event_id within the batch: entry id of its first occurrence -> the rest."""
    call: Call


def plan_writes(p: Protocol, work: Mapping[str, list[Entry]], token: str, lanes: Lanes) -> Plan:
    """Stage write, its call. An entry delivered more than MAX_DELIVERIES times is only
    probed: applied already (its replica died before the XACK), it is acknowledged, else
    dead-lettered."""
    most = p.s.max_deliveries
    followers: dict[bytes, list[Entry]] = defaultdict(list)
    writes: list[Write] = []
    for name, items in work.items():
        if len(items) == 1 and items[0].deliveries <= most:
            writes.append(Write(name, [items[0].event]))  # the common case, many counters
            continue
        if all(e.event.event_id is None and e.deliveries <= most for e in items):
            writes += _chunks(name, [e.event for e in items], False)  # the common case
            continue
        first_of: dict[bytes, bytes] = {}
        fresh: list[Event] = []
        worn: list[Event] = []
        for e in items:
            key = e.event.event_id
            if key is not None and key in first_of:
                followers[first_of[key]].append(e)
                continue
            if key is not None:
                first_of[key] = e.entry_id
            (worn if e.deliveries > most else fresh).append(e.event)
        writes += _chunks(name, fresh, False) + _chunks(name, worn, True)
    return Plan(writes, followers, _apply_call(p, token, writes, lanes))


def _apply_call(p: Protocol, token: str, writes: list[Write], lanes: Lanes) -> Call:
    return counters.apply_call(p.stream_key, token, writes, p.s.dedupe_window_ms, lanes).packed()


def _chunks(name: str, items: list[Event], probe: bool) -> list[Write]:
    return [Write(name, items[i : i + MAX_WRITE], probe) for i in range(0, len(items), MAX_WRITE)]


def as_planned(raw: object, writes: list[Write], busy: Container[str]) -> bool:
    """Every counter written (reply 1), but the busy ones, refused by fencing (reply 0)."""
    if not isinstance(raw, list):
        return False
    if raw.count(1) == len(raw):
        return True
    return bool(busy) and all(
        x == 1 or (x == 0 and w.name in busy) for x, w in zip(raw, writes, strict=True)
    )


def judge_writes(
    p: Protocol,
    raw: object,
    writes: list[Write],
    entries: Mapping[bytes, Entry],
    busy: Container[str],
    acked: dict[str, list[Entry]],
    outcome: Outcome,
) -> list[Write]:
    """Stage write, its reply: what was written or found written goes to ``acked``; returns
    the writes to try again (a failed sum's entries one by one; those found written, the
    rest). Entries delivered MAX_DELIVERIES times whose write failed are dead-lettered."""
    again: list[Write] = []
    most = p.s.max_deliveries
    for write, result in zip(writes, counters.parse_apply(raw, len(writes)), strict=True):
        name, ids = write.name, [e.entry_id for e in write.events]
        if name in busy:
            continue  # refused, as planned: its entries are given back busy
        items = [entries[i] for i in ids]
        if result.outcome is Written.APPLIED:
            acked[name] += items
            outcome.applied += len(items)
        elif result.outcome is Written.LOCK_LOST:
            p.log.warning(
                "lock lost before the write: write refused, entries kept for a retry",
                counter=name,
                entries=len(items),
            )
            outcome.lost += items
            outcome.lock_lost += len(items)
        elif result.outcome is Written.ALREADY_APPLIED:
            skipped = set(result.skipped)
            acked[name] += [items[i] for i in skipped]
            outcome.duplicates += len(skipped)
            rest = [e.event for i, e in enumerate(items) if i not in skipped]
            if rest:
                again.append(Write(name, rest, write.probe))
        elif result.outcome is Written.NOT_APPLIED:
            reason = "delivered {} times, more than MAX_DELIVERIES=" + str(most)
            outcome.failed += [(e, reason.format(e.deliveries)) for e in items]
        elif result.transient:
            # Redis refuses writes for now (OOM, ...): not the entries' fault. Keep them,
            # finish the batch, then back off.
            outcome.lost += items
            outcome.refused = result.error
        elif len(items) == 1:
            outcome.write_failures += 1
            outcome.failed.append((items[0], result.error))
        else:  # the sum failed: try each entry on its own
            again += [Write(name, [e], write.probe) for e in write.events]
    return again


def worn_out(p: Protocol, outcome: Outcome) -> list[Rejected]:
    """Failed entries delivered MAX_DELIVERIES times: to dead-letter with Redis' error
    (their fields copied from the stream by deadletter.lua); the others stay in
    ``failed``, pending, for a retry after CLAIM_IDLE_MS."""
    most = p.s.max_deliveries
    worn = [Rejected(e.entry_id, None, why) for e, why in outcome.failed if e.deliveries >= most]
    outcome.failed = [(e, why) for e, why in outcome.failed if e.deliveries < most]
    return worn


class Finish(NamedTuple):
    round: Round
    acks: bool
    """Whether it starts with an XACK of what was written."""
    releases: list[str]
    """The counters whose lanes the finish script releases, in its order."""
    dead: list[Rejected]


def finish_round(
    p: Protocol,
    token: str,
    acked: Mapping[str, list[Entry]],
    released: Sequence[str],
    lanes: Lanes,
    dead: list[Rejected],
    gone: list[bytes],
) -> Finish:
    """Stage finish: XACK, then per counter release its lanes and remove (or cut short) the
    markers of its acknowledged entries, then dead-letter, then XACK the deleted entries."""
    s = p.s
    calls: list[Call] = []
    ack_ids = [e.entry_id for items in acked.values() for e in items]
    if ack_ids:
        calls.append(Call.command("XACK", s.stream, s.group, *ack_ids).packed())
    releases = [(n, lanes[n], [e.entry_id for e in acked.get(n, ())]) for n in released]
    if releases:
        calls.append(counters.finish_call(p.stream_key, token, releases, s.lock_ttl_ms).packed())
    if dead:
        calls.append(deadletter.dead_letter_call(s.stream, s.dead_letter, s.group, p.me, dead))
    if gone:
        calls.append(Call.command("XACK", s.stream, s.group, *gone))
    return Finish(Round("finish", calls, acked=releases), bool(ack_ids), list(released), dead)


def judge_finish(
    p: Protocol, replies: list[Any], done: Finish, acked: Mapping[str, list[Entry]]
) -> tuple[list[Rejected], Exception | None]:
    """Stage finish, its replies: the entries dead-lettered, and the first error, if any."""
    error = next((r for r in replies if isinstance(r, Exception)), None)
    at = int(done.acks)
    if done.releases and not isinstance(replies[at], Exception):
        for name, reply in zip(done.releases, replies[at], strict=True):
            if isinstance(reply, bytes):  # an error text: e.g. the markers key's type
                p.log.warning("could not release a counter", counter=name, error=reply.decode())
            elif reply == 0 and acked.get(name):
                p.log.warning(
                    "lock lane lost before the finish: entry markers expire one lock TTL later",
                    counter=name,
                    entries=len(acked[name]),
                )
    at += bool(done.releases)
    moved: set[bytes] = set()
    if done.dead and not isinstance(replies[at], Exception):
        moved = {bytes(i) for i in replies[at]}
    return [r for r in done.dead if r.entry_id in moved], error


# -- one batch: the stages strung together -----------------------------------------------


class Stage(Enum):
    TAKE_LANES = "take_lanes"
    CONFIRM = "confirm"
    WRITE = "write"
    FINISH = "finish"
    DONE = "done"


class Batch:
    """One batch's way through the stages. The driver sends ``round``, may call ``plan_ahead``
    while Redis runs it, and gives the replies to ``advance``; ``outcome`` is final once
    ``stage`` is DONE. Errors of the stages before the finish are raised (nothing was
    acknowledged; the locks expire by TTL)."""

    def __init__(self, p: Protocol, parsed: Parsed, read: int) -> None:
        self.p = p
        self.outcome = Outcome(read=read)
        self.entries = parsed.entries
        self.rejected = parsed.rejected
        self.gone = parsed.gone
        self.outcome.deleted += parsed.gone
        self.token = p.locks.tokens.next()
        self.by_counter: dict[str, list[Entry]] = {}
        for e in parsed.entries:
            self.by_counter.setdefault(e.event.counter, []).append(e)
        self.lanes, others = lanes_of(self.by_counter, p.me)
        self.taken = Taken([], [], [])
        self.acked: dict[str, list[Entry]] = defaultdict(list)
        self.work: dict[str, list[Entry]] = {}
        self.plan: Plan | None = None
        self._guess: Plan | Finish | None = None
        self._pending: dict[bytes, int] = {}
        self._count = len(self.entries) + 1000
        self._writes = 0
        if self.entries:
            self.stage = Stage.TAKE_LANES
            self.round, self.keys = take_lanes(p, self.lanes, others, self.token, self._count)
        else:
            self._go_finish([])

    @property
    def done(self) -> bool:
        return self.stage is Stage.DONE

    def plan_ahead(self) -> None:
        """While Redis runs ``round``: build the next round as if all goes well."""
        if self.stage is Stage.TAKE_LANES:
            self._guess = plan_writes(self.p, self.by_counter, self.token, self.lanes)
        elif self.stage is Stage.WRITE and self._writes == 0:
            self._guess = self._finish_round(self.work, [])  # (busy counters are not in the work)

    def advance(self, replies: list[Any]) -> None:
        if self.stage is Stage.TAKE_LANES:
            self._after_take_lanes(replies)
        elif self.stage is Stage.CONFIRM:
            kept = stream.parse_claim_own(replies)
            self._pending.update(kept.counts)
            self.outcome.deleted += kept.deleted  # off the pending list: dropped
            self._after_confirm()
        elif self.stage is Stage.WRITE:
            self._after_write(replies[0])
        elif self.stage is Stage.FINISH:
            assert isinstance(self._guess, Finish)
            dead, self.outcome.error = judge_finish(self.p, replies, self._guess, self.acked)
            self.outcome.dead_lettered = dead
            self.stage = Stage.DONE

    def _after_take_lanes(self, replies: list[Any]) -> None:
        taken, confirmed = replies
        for reply in (taken, confirmed):
            if isinstance(reply, Exception):
                raise reply
        self.taken = lanes_taken(self.p, self.keys, taken, self.lanes)
        self.outcome.busy_counters = len(self.taken.busy)
        self._pending = {entry[0]: entry[3] for entry in confirmed}
        if len(confirmed) == self._count:  # our pending list is longer: ask by id
            unseen = [e.entry_id for e in self.entries if e.entry_id not in self._pending]
            if unseen:
                s = self.p.s
                calls = stream.claim_own_calls(s.stream, s.group, self.p.me, unseen)
                self.stage, self.round = Stage.CONFIRM, Round("confirm", calls)
                return
        self._after_confirm()

    def _after_confirm(self) -> None:
        locked, busy = self.taken.locked, self.taken.busy
        ours, again, missing = still_ours(self.by_counter, self._pending)
        self.outcome.held += again
        self.outcome.busy += (e for n in busy for e in ours[n])
        guess = self._guess
        if not missing and not again and isinstance(guess, Plan) and locked:
            # As guessed, but for busy counters: they stay in the call, and fencing refuses
            # them (our token does not hold all their lanes): cheaper than a new call.
            self.work, self.plan = {n: ours[n] for n in locked}, guess
        else:
            self.work = {n: ours[n] for n in locked if ours[n]}
            self.plan = plan_writes(self.p, self.work, self.token, self.lanes) if locked else None
            deleted = set(self.outcome.deleted)
            dropped = [i for i in missing if i not in deleted]
            if dropped:
                self.p.log.info(
                    "entries no longer pending were dropped: acknowledged by another replica, "
                    "or deleted from the stream",
                    count=len(dropped),
                    ids=[i.decode() for i in dropped[:10]],
                )
        self._guess = None
        if self.plan is None or not self.plan.writes:
            self._go_finish([])
        else:
            self.stage, self.round = Stage.WRITE, Round("write", [self.plan.call])

    def _after_write(self, raw: object) -> None:
        assert self.plan is not None
        busy = set(self.taken.busy)
        guess, self._guess = self._guess, None
        self._writes += 1
        if (
            isinstance(guess, Finish)
            and not self.plan.followers
            and as_planned(raw, self.plan.writes, busy)
        ):
            self.outcome.applied += sum(len(items) for items in self.work.values())
            self.acked = defaultdict(list, self.work)
            self.stage, self.round, self._guess = Stage.FINISH, guess.round, guess
            return
        entries = {e.entry_id: e for items in self.work.values() for e in items}
        again = judge_writes(self.p, raw, self.plan.writes, entries, busy, self.acked, self.outcome)
        if again:
            call = _apply_call(self.p, self.token, again, self.lanes)
            self.plan = Plan(again, self.plan.followers, call)
            self.round = Round("write", [call])
            return
        self._ride_along(self.plan.followers)
        self._go_finish(worn_out(self.p, self.outcome))

    def _ride_along(self, followers: dict[bytes, list[Entry]]) -> None:
        """Entries that repeat an event_id of the batch share their first one's fate."""
        for items in list(self.acked.values()):
            for e in list(items):
                extra = followers.pop(e.entry_id, [])
                items += extra
                self.outcome.duplicates += len(extra)
        for extra in followers.values():
            # Their first one was not written: retry them with it (a busy counter's
            # followers are given back busy already).
            busy = set(self.taken.busy)
            self.outcome.lost += (e for e in extra if e.event.counter not in busy)

    def _go_finish(self, worn: list[Rejected]) -> None:
        done = self._finish_round(self.acked, worn)
        self.stage, self.round, self._guess = Stage.FINISH, done.round, done
        if not done.round.calls:
            self.stage = Stage.DONE

    def _finish_round(self, acked: Mapping[str, list[Entry]], worn: list[Rejected]) -> Finish:
        released = self.taken.locked + self.taken.partial
        return finish_round(
            self.p, self.token, acked, released, self.lanes, self.rejected + worn, self.gone
        )
