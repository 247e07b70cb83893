"""The worker's running totals (its ``progress`` and ``stopped`` log lines)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
