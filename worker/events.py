"""The event contract: parse and validate one stream entry.

An entry is a flat list of string fields. ``counter`` is required (non-empty UTF-8, at most
256 bytes); ``op`` is ``incr`` (default) or ``decr``; ``amount`` is an integer in
1 .. 2**63-1 (default 1); ``event_id`` is the producer's idempotency key (non-empty, at most
256 bytes), scoped to the counter. Other fields are kept but ignored. A field that appears
twice is ambiguous and rejected.
"""

from __future__ import annotations

from typing import NamedTuple

from worker.errors import InvalidEvent

MAX_NAME_BYTES = 256
MAX_EVENT_ID_BYTES = 256
MAX_AMOUNT = 2**63 - 1
_MAX_AMOUNT_DIGITS = len(str(MAX_AMOUNT))


class Event(NamedTuple):
    """A valid entry, parsed: the event contract and nothing else (what a replica does with
    it, and when, is ``worker.hand.Entry``)."""

    entry_id: bytes
    counter: str
    delta: int
    """Signed: +amount for incr, -amount for decr."""
    event_id: bytes | None


def parse(entry_id: bytes, flat: list[bytes]) -> Event:
    """Validate one entry given as Redis returns it (``[f1, v1, f2, v2, ...]``).

    Raises InvalidEvent with a reason in words.
    """
    raw_name = op = raw_amount = event_id = None
    for i in range(0, len(flat) - 1, 2):
        name = flat[i]
        if name == b"counter":
            if raw_name is not None:
                _duplicate(name)
            raw_name = flat[i + 1]
        elif name == b"amount":
            if raw_amount is not None:
                _duplicate(name)
            raw_amount = flat[i + 1]
        elif name == b"op":
            if op is not None:
                _duplicate(name)
            op = flat[i + 1]
        elif name == b"event_id":
            if event_id is not None:
                _duplicate(name)
            event_id = flat[i + 1]

    if raw_name is None:
        raise InvalidEvent("missing required field 'counter'")
    if not raw_name:
        raise InvalidEvent("field 'counter' is empty")
    if len(raw_name) > MAX_NAME_BYTES:
        raise InvalidEvent(
            f"field 'counter' is {len(raw_name)} bytes long; the limit is {MAX_NAME_BYTES}"
        )
    try:
        counter = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent("field 'counter' is not valid UTF-8") from None

    if op is None or op == b"incr":
        sign = 1
    elif op == b"decr":
        sign = -1
    else:
        raise InvalidEvent(f"field 'op' must be 'incr' or 'decr', got {_show(op)}")

    if raw_amount is None:
        amount = 1
    elif 0 < len(raw_amount) < 19 and raw_amount.isdigit() and raw_amount[0] != 48:  # b"0"
        amount = int(raw_amount)  # plain digits, no leading zero: 1 .. 10**18-1
    else:
        amount = _parse_amount(raw_amount)

    if event_id is not None:
        if not event_id:
            raise InvalidEvent("field 'event_id' is empty")
        if len(event_id) > MAX_EVENT_ID_BYTES:
            raise InvalidEvent(
                f"field 'event_id' is {len(event_id)} bytes long; the limit is {MAX_EVENT_ID_BYTES}"
            )
    return Event(entry_id, counter, sign * amount, event_id)


def _duplicate(name: bytes) -> None:
    raise InvalidEvent(f"field '{name.decode()}' appears more than once")


def _parse_amount(raw: bytes) -> int:
    # Only plain ASCII digits: no sign, no spaces, no underscores, no exponent.
    if not raw.isdigit() or not raw.isascii():
        raise InvalidEvent(f"field 'amount' must be a whole number, got {_show(raw)}")
    stripped = raw.lstrip(b"0") or b"0"
    if len(stripped) > _MAX_AMOUNT_DIGITS or int(stripped) > MAX_AMOUNT:
        raise InvalidEvent(f"field 'amount' must be at most {MAX_AMOUNT}, got {_show(raw)}")
    amount = int(stripped)
    if amount < 1:
        raise InvalidEvent("field 'amount' must be at least 1, got 0")
    return amount


def _show(raw: bytes, limit: int = 40) -> str:
    text = raw[:limit].decode("utf-8", "backslashreplace")
    return repr(text + ("..." if len(raw) > limit else ""))
