"""Entries deleted from the stream while pending: the walk that tells counted from lost."""

from __future__ import annotations

import pytest
import redis

from worker import counters, deleted
from worker.deleted import PAGE, DeletedEntries, Verdict

LOCK_TTL_MS = 200


def markers_keys(r: redis.Redis, n: int) -> None:
    """``n`` counters with a markers key (an event_id marker each), as busy replicas leave."""
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.zadd(counters.applied_key(f"c{i}"), {f"k:e{i}": 4_000_000_000_000})
    pipe.execute()


def walk(search: DeletedEntries) -> list[Verdict]:
    verdicts: list[Verdict] = []
    for _ in range(1000):
        verdicts += search.walk()
        if not search.busy():
            return verdicts
    raise AssertionError("the walk did not end")


def test_walk_over_many_markers_keys_finds_the_counted_entry_and_reports_the_lost_one(
    r: redis.Redis,
) -> None:
    markers_keys(r, 3 * PAGE)  # several pages
    r.zadd(counters.applied_key("c123"), {b"x:events|5-0": 4_000_000_000_000})
    r.set("unrelated", "1")
    search = DeletedEntries(r, "events", LOCK_TTL_MS)
    search.add([b"5-0", b"6-0"])
    verdicts = walk(search)
    assert sorted(verdicts, key=lambda v: v.entry_id) == [
        Verdict(b"5-0", "c123"),
        Verdict(b"6-0", None),
    ]
    # The found marker ends one lock TTL from now, the other markers of its key untouched.
    now_ms = r.time()[0] * 1000
    assert r.zscore(counters.applied_key("c123"), b"x:events|5-0") <= now_ms + LOCK_TTL_MS + 1000
    assert r.zscore(counters.applied_key("c123"), b"k:e123") == 4_000_000_000_000


def test_ids_found_deleted_during_a_walk_get_a_whole_walk_of_their_own(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deleted, "BUDGET_S", 0)  # one page a step
    markers_keys(r, 3 * PAGE)
    r.zadd(counters.applied_key("c7"), {b"x:events|9-0": 4_000_000_000_000})
    search = DeletedEntries(r, "events", LOCK_TTL_MS)
    search.add([b"1-0"])
    verdicts = search.walk()  # part of the way, then 9-0 is found deleted too
    assert search.busy()
    search.add([b"9-0"])
    verdicts += walk(search)
    assert sorted(verdicts, key=lambda v: v.entry_id) == [
        Verdict(b"1-0", None),
        Verdict(b"9-0", "c7"),
    ]


def test_markers_of_another_stream_with_the_same_id_are_not_taken_for_ours(
    r: redis.Redis,
) -> None:
    r.zadd(counters.applied_key("a"), {b"x:other|5-0": 4_000_000_000_000})
    search = DeletedEntries(r, "events", LOCK_TTL_MS)
    search.add([b"5-0"])
    assert walk(search) == [Verdict(b"5-0", None)]
