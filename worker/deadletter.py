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

from worker import scripts
from worker.scripts import Call

DEAD_LETTER = scripts.Script.load("deadletter")

MAX_FIELDS = 1000
"""Fields copied from one entry. Lua cannot unpack much more than 8,000 values into one
XADD; an entry with more fields keeps its first MAX_FIELDS and says so in
``fields_truncated`` (the original stays in the stream until it is trimmed)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    entry_id: bytes
    fields: list[bytes] | None
    """The original entry, flat: [field1, value1, ...]; None: copy them from the stream
    (deadletter.lua), for a valid entry whose fields were not kept."""
    reason: str


def dead_letter_call(
    stream: str, dead_stream: str, group: str, consumer: str, rejected: Sequence[Rejected]
) -> Call:
    args: list[str | bytes | int] = [group, consumer]
    for item in rejected:
        fields = item.fields
        if fields is None:
            args += [item.entry_id, item.reason, -1, MAX_FIELDS]
            continue
        total = len(fields) // 2
        if total > MAX_FIELDS:
            note = f"{MAX_FIELDS} of {total} fields kept".encode()
            fields = [*fields[: 2 * MAX_FIELDS], b"fields_truncated", note]
        args += [item.entry_id, item.reason, len(fields) // 2, *fields]
    return Call.eval(DEAD_LETTER, [stream, dead_stream], args)
