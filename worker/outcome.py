"""What a batch did: per-batch outcome, and the worker's running totals (its log lines)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from worker.events import Event


@dataclass(slots=True)
class Stats:
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    write_failures: int = 0
    lock_lost: int = 0
    lock_busy: int = 0
    reclaimed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class BatchOutcome:
    lost: list[Event] = field(default_factory=list)
    """Not written because the lock was lost (or Redis refused for now): retry them."""
    failed: list[tuple[Event, str]] = field(default_factory=list)
    """The write failed for these entries: (entry, Redis' error). They stay pending."""
    busy: list[Event] = field(default_factory=list)
    """Their counter's lock stayed busy for LOCK_WAIT_MS."""
    applied: int = 0
    duplicates: int = 0
    refused: str = ""
    """A transient Redis error that refused a write (e.g. OOM): back off after the batch."""
    lock_wait_ms: float = 0.0
    """Time spent waiting (holding no lock) for busy counters."""
    held: list[Event] = field(default_factory=list)
    """Delivered again since they were read: to hold for LOCK_TTL_MS before applying."""
    deleted: list[bytes] = field(default_factory=list)
    """Found deleted from the stream (and so taken off the pending list): not applied."""
