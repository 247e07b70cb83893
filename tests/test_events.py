"""The event contract (worker.events.parse): pure unit tests, no Redis.

The rejection reason goes to users in the dead-letter stream, so the tests assert on it.
"""

from __future__ import annotations

import pytest

from worker.errors import InvalidEvent
from worker.events import MAX_AMOUNT, Event, parse

ID = b"1700000000000-0"


def entry(**fields: bytes | str) -> list[bytes]:
    flat: list[bytes] = []
    for name, value in fields.items():
        flat += [name.encode(), value.encode() if isinstance(value, str) else value]
    return flat


def rejected(flat: list[bytes]) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse(ID, flat)
    assert info.value.reason == str(info.value)
    return info.value.reason


def test_minimal_entry_defaults_to_incr_by_one_without_event_id() -> None:
    assert parse(ID, entry(counter="hits")) == Event(ID, "hits", 1, None)


def test_decr_gives_a_negative_delta() -> None:
    event = parse(ID, entry(counter="hits", op="decr", amount="7"))
    assert event.delta == -7


def test_explicit_incr_and_event_id_are_kept() -> None:
    event = parse(ID, entry(counter="hits", op="incr", amount="3", event_id="ev-1"))
    assert (event.delta, event.event_id) == (3, b"ev-1")


@pytest.mark.parametrize("op", ["incr", "decr"])
def test_max_amount_is_accepted_exactly(op: str) -> None:
    event = parse(ID, entry(counter="c", op=op, amount=str(2**63 - 1)))
    assert abs(event.delta) == MAX_AMOUNT == 2**63 - 1


def test_leading_zeros_do_not_change_the_amount() -> None:
    assert parse(ID, entry(counter="c", amount="0042")).delta == 42


@pytest.mark.parametrize(
    ("amount", "reason"),
    [
        (str(2**63), f"field 'amount' must be at most {2**63 - 1}, got '{2**63}'"),
        ("99999999999999999999", f"field 'amount' must be at most {2**63 - 1}"),
        ("0", "field 'amount' must be at least 1, got 0"),
        ("000", "field 'amount' must be at least 1"),
        ("-5", "field 'amount' must be a whole number, got '-5'"),
        ("+5", "field 'amount' must be a whole number, got '+5'"),
        (" 5", "field 'amount' must be a whole number, got ' 5'"),
        ("5 ", "field 'amount' must be a whole number"),
        ("1.5", "field 'amount' must be a whole number, got '1.5'"),
        ("1e3", "field 'amount' must be a whole number, got '1e3'"),
        ("1_000", "field 'amount' must be a whole number"),
        ("0x10", "field 'amount' must be a whole number"),
        ("", "field 'amount' must be a whole number, got ''"),
        ("\u0665", "field 'amount' must be a whole number"),  # Arabic-Indic five
        ("\uff15", "field 'amount' must be a whole number"),  # fullwidth five
        ("\xb2", "field 'amount' must be a whole number"),  # superscript two
    ],
)
def test_amount_outside_the_contract_is_rejected_with_a_reason(amount: str, reason: str) -> None:
    assert rejected(entry(counter="c", amount=amount)).startswith(reason)


def test_huge_run_of_digits_is_rejected_without_crashing_and_reason_is_truncated() -> None:
    reason = rejected(entry(counter="c", amount="9" * 10_000))
    assert reason.startswith(f"field 'amount' must be at most {MAX_AMOUNT}, got '999")
    assert reason.endswith("...'")
    assert len(reason) < 200


def test_huge_run_of_non_digits_is_rejected_and_reason_is_truncated() -> None:
    reason = rejected(entry(counter="c", amount="9" * 10_000 + "x"))
    assert reason.startswith("field 'amount' must be a whole number")
    assert len(reason) < 200


@pytest.mark.parametrize(
    ("flat", "reason"),
    [
        (entry(op="incr", amount="1"), "missing required field 'counter'"),
        ([], "missing required field 'counter'"),
        (entry(counter=""), "field 'counter' is empty"),
        (entry(counter="a" * 257), "field 'counter' is 257 bytes long; the limit is 256"),
        (entry(counter="\u00e9" * 129), "field 'counter' is 258 bytes long; the limit is 256"),
        (entry(counter=b"ab\xff\xfe"), "field 'counter' is not valid UTF-8"),
        (entry(counter=b"\xc3"), "field 'counter' is not valid UTF-8"),
    ],
)
def test_bad_counter_name_is_rejected_with_a_reason(flat: list[bytes], reason: str) -> None:
    assert rejected(flat) == reason


def test_counter_name_of_exactly_256_bytes_is_accepted() -> None:
    assert parse(ID, entry(counter="a" * 256)).counter == "a" * 256


@pytest.mark.parametrize("name", ["caf\u00e9", "\u8a08\u6570\u5668", "\U0001f600-emoji", "a b:{x}"])
def test_multibyte_utf8_counter_name_is_accepted_and_decoded(name: str) -> None:
    assert parse(ID, entry(counter=name.encode())).counter == name


@pytest.mark.parametrize("op", ["INCR", "Decr", "inc", "add", "", " incr", "incr\x00"])
def test_op_other_than_incr_or_decr_is_rejected_with_a_reason(op: str) -> None:
    reason = rejected(entry(counter="c", op=op))
    assert reason == f"field 'op' must be 'incr' or 'decr', got {op!r}"


@pytest.mark.parametrize(
    ("event_id", "reason"),
    [
        ("", "field 'event_id' is empty"),
        ("e" * 257, "field 'event_id' is 257 bytes long; the limit is 256"),
    ],
)
def test_bad_event_id_is_rejected_with_a_reason(event_id: str, reason: str) -> None:
    assert rejected(entry(counter="c", event_id=event_id)) == reason


def test_event_id_of_exactly_256_bytes_is_accepted() -> None:
    assert parse(ID, entry(counter="c", event_id="e" * 256)).event_id == b"e" * 256


@pytest.mark.parametrize("field", ["counter", "op", "amount", "event_id"])
def test_duplicated_known_field_is_rejected_as_ambiguous(field: str) -> None:
    flat = entry(counter="c", op="incr", amount="2", event_id="ev")
    first = flat.index(field.encode())
    flat += flat[first : first + 2]
    assert rejected(flat) == f"field '{field}' appears more than once"


def test_duplicated_known_field_is_rejected_even_with_identical_values() -> None:
    flat = [b"counter", b"c", b"counter", b"c"]
    assert rejected(flat) == "field 'counter' appears more than once"


def test_unknown_extra_fields_are_ignored_even_when_repeated() -> None:
    flat = [b"source", b"web", b"counter", b"c", b"source", b"app", b"Counter", b"other"]
    flat += [b"amount", b"5", b"COUNTER", b"\xff"]
    assert parse(ID, flat) == Event(ID, "c", 5, None)


def test_entry_id_is_carried_through_unchanged() -> None:
    assert parse(b"5-3", entry(counter="c")).entry_id == b"5-3"
