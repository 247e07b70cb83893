"""The dead-letter stream: rejected entries, with their original fields, ``error`` and
``source_id``, written and acknowledged in one atomic script call.

The script moves an entry only while it is still pending for the calling consumer, so each
rejected entry lands there exactly once: a replica killed after the call has moved and
acknowledged it, one killed before has done neither, and a replica that lost the entry to
another (XAUTOCLAIM) leaves the judgement to the new owner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from worker import scripts
from worker.scripts import Call, Pipe, Round

DEAD_LETTER = scripts.Script.load("deadletter")

MAX_FIELDS = 1000
"""Fields copied from one entry. Lua cannot unpack much more than 8,000 values into one
XADD; an entry with more fields keeps its first MAX_FIELDS and says so in
``fields_truncated`` (the original stays in the stream until it is trimmed)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    entry_id: bytes
    fields: list[bytes]
    """The original entry, flat: [field1, value1, ...] (empty if it was deleted)."""
    reason: str


def dead_letter_call(
    stream: str, dead_stream: str, group: str, consumer: str, rejected: Sequence[Rejected]
) -> Call:
    args: list[str | bytes | int] = [group, consumer]
    for item in rejected:
        fields = item.fields
        total = len(fields) // 2
        if total > MAX_FIELDS:
            note = f"{MAX_FIELDS} of {total} fields kept".encode()
            fields = [*fields[: 2 * MAX_FIELDS], b"fields_truncated", note]
        args += [item.entry_id, item.reason, len(fields) // 2, *fields]
    return Call.eval(DEAD_LETTER, [stream, dead_stream], args)


def move(
    client: redis.Redis | Pipe,
    stream: str,
    dead_stream: str,
    group: str,
    consumer: str,
    rejected: Sequence[Rejected],
) -> list[bytes]:
    """Dead-letter and acknowledge ``rejected``; return the ids actually moved."""
    if not rejected:
        return []
    pipe = client if isinstance(client, Pipe) else Pipe(client)
    call = dead_letter_call(stream, dead_stream, group, consumer, rejected)
    ((result,),) = pipe.exchange([Round("dead_letter", [call])])
    if isinstance(result, Exception):
        raise result
    assert isinstance(result, list)
    return [bytes(r) for r in result]
