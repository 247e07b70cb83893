"""Reading the stream through the consumer group, as raw entries with delivery counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis

from worker import scripts
from worker.scripts import Call, Round

CLAIM_OWN = scripts.Script.load("claim_own")


class Delivery(NamedTuple):
    entry_id: bytes
    fields: list[bytes] | None
    """Flat [field1, value1, ...]; None if the entry was deleted from the stream."""
    deliveries: int
    owner: str | None = None
    """The consumer it was claimed from, when not this one (``reclaim``)."""


def parse_entries(raw: Any) -> list[tuple[bytes, list[bytes] | None]]:
    """[[id, [f, v, ...] or nil], ...] -> [(id, fields or None), ...]"""
    return [(item[0], item[1]) for item in raw or ()]


def read_new(
    client: redis.Redis, stream: str, group: str, consumer: str, count: int, block_ms: int | None
) -> list[Delivery]:
    """Entries never delivered to anyone (XREADGROUP >): delivery count 1."""
    reply = scripts.raw(client, *read_call(stream, group, consumer, count, block_ms).args)
    return [Delivery(entry[0], entry[1], 1) for entry in reply[0][1]] if reply else []


def read_call(stream: str, group: str, consumer: str, count: int, block_ms: int | None) -> Call:
    """XREADGROUP of entries never delivered to anyone; blocks only with ``block_ms``."""
    args: list[str | int] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    return Call.command(*args, "STREAMS", stream, ">")


def read_own_pending(
    client: redis.Redis, stream: str, group: str, consumer: str, after: bytes, count: int
) -> list[Delivery]:
    """This consumer's pending entries with id > ``after``, counted as a new delivery.

    For a process that starts with a name that has pending entries: its predecessor
    died with them in hand, so this is a redelivery (a poison entry that kills every
    replica still reaches MAX_DELIVERIES).
    """
    reply = scripts.raw(
        client, "XREADGROUP", "GROUP", group, consumer, "COUNT", count, "STREAMS", stream, after
    )
    if not reply:
        return []
    entries = parse_entries(reply[0][1])
    counts = delivery_counts(client, stream, group, [i for i, _ in entries])
    return [Delivery(i, f, counts.get(i, 1)) for i, f in entries]


def refetch_own_pending(
    client: redis.Redis, stream: str, group: str, consumer: str, after: bytes, count: int
) -> list[Delivery]:
    """This consumer's pending entries with id > ``after``, *without* a new delivery.

    After a lost connection the process is alive and the entries were never refused: reading
    them again must not push them towards MAX_DELIVERIES (a flapping network would otherwise
    dead-letter valid events). XPENDING gives ids and counts, XRANGE the fields.
    """
    start = b"-" if after == b"0-0" else b"(" + after
    pending = _counts(client.xpending_range(stream, group, start, "+", count, consumer))
    fields = fetch_fields(client, stream, list(pending))
    return [Delivery(i, fields[i], times) for i, times in pending.items()]


def fetch_fields(
    client: redis.Redis, stream: str, ids: Sequence[bytes]
) -> dict[bytes, list[bytes] | None]:
    """The fields of each entry (None if it was deleted), one pipelined XRANGE per id, raw
    (``scripts.raw``)."""
    found: dict[bytes, list[bytes] | None] = {}
    if not ids:
        return found
    round_ = Round("", [Call.command("XRANGE", stream, i, i) for i in ids])
    (replies,) = scripts.Pipe(client).exchange([round_])
    for entry_id, reply in zip(ids, replies, strict=True):
        if isinstance(reply, Exception):
            raise reply
        found[entry_id] = reply[0][1] if reply else None
    return found


def delivery_counts(
    client: redis.Redis, stream: str, group: str, ids: Sequence[bytes]
) -> dict[bytes, int]:
    """Delivery count of each id still pending (one pipelined XPENDING per id)."""
    pipe = client.pipeline(transaction=False)
    for i in ids:
        pipe.xpending_range(stream, group, i, i, 1)
    return {i: times for found in pipe.execute() for i, times in _counts(found).items()}


def _counts(rows: list[dict[str, Any]]) -> dict[bytes, int]:
    """redis-py's XPENDING rows -> entry id: delivery count (in the rows' order)."""
    return {row["message_id"]: int(row["times_delivered"]) for row in rows}


def confirm_call(stream: str, group: str, consumer: str, count: int) -> Call:
    """XPENDING ... - + count consumer: this consumer's pending entries, oldest first.

    Which entries of a batch are still ours to apply: those not listed were acknowledged
    by another replica (after claiming them), or deleted. Read-only and cheap, unlike an
    XCLAIM of every id (which Redis replicates entry by entry).
    """
    return Call.command("XPENDING", stream, group, "-", "+", count, consumer)


@dataclass(frozen=True, slots=True)
class Kept:
    """What a keep-ours claim found (claim_own.lua)."""

    counts: dict[bytes, int]
    """Entries still pending for us, claimed ours again: their delivery counts."""
    deleted: list[bytes]
    """Entries that were pending for us but are deleted from the stream: the claim took
    them off the pending list."""


def claim_own(
    client: redis.Redis, stream: str, group: str, consumer: str, ids: Sequence[bytes]
) -> Kept:
    """Of ``ids``, the entries still pending for ``consumer``, claimed to it again (idle
    time reset, no delivery counted), and those found deleted (see claim_own.lua)."""
    pipe = client.pipeline(transaction=False)
    for call in claim_own_calls(stream, group, consumer, ids):
        pipe.eval(CLAIM_OWN.source.decode(), len(call.keys), *call.keys, *call.args)
    return parse_claim_own(pipe.execute(raise_on_error=False))


def claim_own_calls(stream: str, group: str, consumer: str, ids: Sequence[bytes]) -> list[Call]:
    """The script calls of ``claim_own``, 1,000 ids each (Lua unpacks at most ~8,000 values
    into one command)."""
    return [
        Call.eval(CLAIM_OWN, [stream], [group, consumer, *ids[i : i + 1000]])
        for i in range(0, len(ids), 1000)
    ]


def parse_claim_own(replies: Sequence[Any]) -> Kept:
    """The replies of ``claim_own_calls``, together; an error reply is raised."""
    kept = Kept({}, [])
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        claimed, deleted = reply
        kept.counts.update(
            (bytes(claimed[i]), int(claimed[i + 1])) for i in range(0, len(claimed), 2)
        )
        kept.deleted.extend(bytes(i) for i in deleted)
    return kept
