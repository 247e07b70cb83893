"""Hostile input: whatever a producer writes, a replica neither crashes nor stalls; what
breaks the event contract is dead-lettered with a reason, the rest is counted exactly."""

from __future__ import annotations

import redis
from helpers import STREAM, MakeConsumer, dead_letters, drained, push, turn_until, values
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import InvalidEvent
from worker.events import MAX_AMOUNT, MAX_NAME_BYTES, parse

KNOWN = [b"counter", b"op", b"amount", b"event_id"]
field_names = st.one_of(st.sampled_from(KNOWN), st.binary(max_size=12))
field_values = st.one_of(
    st.binary(max_size=300),
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.sampled_from([b"incr", b"decr", b"0", b"007", b"1e3", b" 5", "\u0661".encode()]),
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(field_names, field_values), max_size=8))
def test_any_fields_parse_to_a_valid_event_or_a_reason_never_a_crash(
    pairs: list[tuple[bytes, bytes]],
) -> None:
    flat = [x for pair in pairs for x in pair]
    try:
        event = parse(b"1-0", flat)
    except InvalidEvent as exc:
        reason = exc.reason
    else:
        reason = ""
    if reason:  # refused, and said why in words
        return
    counters = [v for k, v in pairs if k == b"counter"]
    assert len(counters) == 1  # exactly one, or it was refused as ambiguous
    assert 0 < len(event.counter.encode()) <= MAX_NAME_BYTES
    assert event.counter.encode() == counters[0]
    assert 1 <= abs(event.delta) <= MAX_AMOUNT
    assert event.event_id is None or 0 < len(event.event_id) <= 256


@settings(max_examples=500, deadline=None)
@given(
    name=st.text(min_size=1, max_size=60).filter(lambda t: len(t.encode()) <= MAX_NAME_BYTES),
    amount=st.integers(1, MAX_AMOUNT),
    decr=st.booleans(),
    event_id=st.one_of(st.none(), st.binary(min_size=1, max_size=256)),
)
def test_every_valid_event_parses_to_its_exact_delta(
    name: str, amount: int, decr: bool, event_id: bytes | None
) -> None:
    flat = [b"counter", name.encode(), b"amount", str(amount).encode()]
    flat += [b"op", b"decr" if decr else b"incr"]
    if event_id is not None:
        flat += [b"event_id", event_id]
    event = parse(b"1-0", flat)
    assert (event.counter, event.delta, event.event_id) == (
        name,
        -amount if decr else amount,
        event_id,
    )


def test_hostile_entries_are_dead_lettered_with_reasons_and_valid_ones_counted(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    hostile = [
        {b"counter": b"x" * (MAX_NAME_BYTES + 1)},  # a name too long
        {b"counter": b"\xff\xfe junk"},  # not UTF-8
        {b"counter": b"ok", b"amount": "\u0661\u0662".encode()},  # Arabic-Indic digits
        {b"counter": b"ok", b"amount": b"9" * 4000},  # a huge number
        {b"\x00\x01": b"\xff", b"amount": b"1"},  # binary junk, no counter
        {b"counter": b"ok", b"op": b"mul"},
    ]
    for fields in hostile:
        r.xadd(STREAM, fields)  # type: ignore[arg-type]
    push(r, "ok", 5)
    r.xadd(STREAM, {b"counter": b"ok", b"blob": b"\x00" * 1_000_000})  # 1 MB, ignored: valid
    many = {f"f{i}".encode(): b"v" for i in range(5000)}
    r.xadd(STREAM, {b"counter": b"ok", **many})  # 5,000 fields, valid
    turn_until(make_consumer(), lambda: drained(r))
    assert values(r, {"ok"}) == {"ok": 7}
    reasons = [fields[b"error"].decode() for fields in dead_letters(r)]
    assert len(reasons) == len(hostile)
    assert all(reasons), reasons
    assert any("UTF-8" in reason for reason in reasons)
    assert any("must be at most" in reason for reason in reasons)
