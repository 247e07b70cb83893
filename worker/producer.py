"""Pushing events from Python, each checked against the event contract before it is sent.

    from worker.producer import Producer, event

    with Producer.connect("redis://localhost:6379/0", stream="events") as producer:
        producer.send(event("page-views", 3))
        producer.send(event("stock:sku-42", 1, decr=True, event_id="order-1001"))
        for sent in producer.send_many(event(f"c{i % 10}") for i in range(10_000)):
            ...  # a list of entry ids per round trip (1,000 events), pipelined

``AsyncProducer`` does the same on ``redis.asyncio``. An event that breaks the contract
raises InvalidEvent with the reason, and nothing of it is sent. Other languages use a
plain XADD with the same fields (README, "Event contract").
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from itertools import islice
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry

from worker import events
from worker.connection import careful_options
from worker.errors import InvalidEvent

Fields = dict[str, str]
"""One event as the stream entry's fields: counter, and optionally op, amount, event_id."""

CHUNK = 1_000
"""Events per round trip in ``send_many``."""


def event(
    counter: str, amount: int = 1, *, decr: bool = False, event_id: str | None = None
) -> Fields:
    """The fields of one event, checked (InvalidEvent with the reason if they break the
    contract)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidEvent(f"amount must be a whole number, got {amount!r}")
    fields = {"counter": counter, "amount": str(amount)}
    if decr:
        fields["op"] = "decr"
    if event_id is not None:
        fields["event_id"] = event_id
    return checked(fields)


def checked(fields: Fields) -> Fields:
    """``fields`` if they make a valid event, else InvalidEvent with the reason."""
    for name, value in fields.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidEvent(
                f"field names and values must be strings, got {_short(name)}: {_short(value)}"
            )
    try:
        flat = [part.encode() for item in fields.items() for part in item]
    except UnicodeEncodeError:  # a lone surrogate, as JSON's "\ud800" gives
        raise InvalidEvent("a field is not valid Unicode (a lone surrogate)") from None
    events.parse(b"0-0", flat)
    return fields


def from_json(line: str) -> Fields:
    """One event from a JSON object with the contract's fields (``amount`` a whole number or
    a string of digits); InvalidEvent with the reason if it is not one."""
    try:
        found = json.loads(line, object_pairs_hook=_once_each)
    except ValueError as exc:  # JSONDecodeError, or an integer of over 4,300 digits
        where = f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidEvent(f"not JSON: {getattr(exc, 'msg', exc)}{where}") from None
    except RecursionError:
        raise InvalidEvent("not JSON: nested too deeply") from None
    if not isinstance(found, dict):
        raise InvalidEvent(f"not a JSON object: {type(found).__name__}")
    unknown = sorted(set(found) - {"counter", "op", "amount", "event_id"})
    if unknown:
        raise InvalidEvent(
            f"unknown field {_short(unknown[0])}: the fields are counter, op, amount, event_id"
        )
    fields: Fields = {}
    for name, value in found.items():
        if name == "amount" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise InvalidEvent(f"field {name!r} must be a string, got {_short(value)}")
        fields[name] = value
    return checked(fields)


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: the contract rejects a repeated field."""
    found = dict(pairs)
    if len(found) < len(pairs):
        twice = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise InvalidEvent(f"field {_short(twice)} appears more than once")
    return found


def _short(value: object, limit: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _chunks(many: Iterable[Fields], size: int) -> Iterator[list[Fields]]:
    it = iter(many)
    while chunk := list(islice(it, size)):
        yield chunk


def _text(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


class Producer:
    """Sends events to one stream (sync). Checks every event before its round trip."""

    def __init__(self, client: redis.Redis, stream: str = "events") -> None:
        self.client, self.stream = client, stream

    @classmethod
    def connect(cls, url: str, stream: str = "events", **kwargs: Any) -> Producer:
        """A producer with its own client (``careful_options``: no silent retries)."""
        return cls(redis.Redis.from_url(url, **{**careful_options(url), **kwargs}), stream)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def send(self, fields: Fields) -> str:
        """XADD one event; its entry id."""
        return _text(self.client.xadd(self.stream, checked(fields)))  # type: ignore[arg-type]

    def send_many(self, many: Iterable[Fields], chunk: int = CHUNK) -> Iterator[list[str]]:
        """XADD events, ``chunk`` per round trip; yields each round trip's entry ids. A chunk
        with an invalid event raises InvalidEvent before any of that chunk is sent."""
        for part in _chunks(many, chunk):
            pipe = self.client.pipeline(transaction=False)
            for fields in part:
                pipe.xadd(self.stream, checked(fields))  # type: ignore[arg-type]
            yield [_text(i) for i in pipe.execute()]


class AsyncProducer:
    """``Producer`` on redis.asyncio."""

    def __init__(self, client: redis.asyncio.Redis, stream: str = "events") -> None:
        self.client, self.stream = client, stream

    @classmethod
    def connect(cls, url: str, stream: str = "events", **kwargs: Any) -> AsyncProducer:
        options = {**careful_options(url, AsyncRetry), **kwargs}
        return cls(redis.asyncio.Redis.from_url(url, **options), stream)

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def send(self, fields: Fields) -> str:
        return _text(await self.client.xadd(self.stream, checked(fields)))  # type: ignore[arg-type]

    async def send_many(
        self, many: Iterable[Fields], chunk: int = CHUNK
    ) -> AsyncIterator[list[str]]:
        for part in _chunks(many, chunk):
            pipe = self.client.pipeline(transaction=False)
            for fields in part:
                pipe.xadd(self.stream, checked(fields))  # type: ignore[arg-type]
            yield [_text(i) for i in await pipe.execute()]
