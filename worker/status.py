"""``stream-counter status``: what an operator needs to see of one stream and its group.

Read-only: nothing here writes to Redis (the lag is not repaired; the replicas do that).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from config import Settings
from worker import lag, replicas


@dataclass(frozen=True, slots=True)
class Consumer:
    name: str
    pending: int
    idle_ms: int
    """Since Redis last delivered it an entry (on Redis 7.0, not reset by an empty read)."""
    live: bool
    """Its replica said it was alive lately (``worker.replicas``)."""


@dataclass(frozen=True, slots=True)
class Status:
    stream: str
    group: str
    length: int
    lag: int | None
    """Entries never delivered to the group (None: no group)."""
    lag_exact: bool
    lag_source: str
    pending: int
    oldest_pending_age_ms: int | None
    """Age of the oldest pending entry, from its id's time (None: nothing pending)."""
    dead_letter_stream: str
    dead_letter_length: int
    consumers: list[Consumer]
    live_replicas: list[str]
    replica_terms: dict[str, str]
    """Each live replica's terms: protocol version and shared settings."""

    @property
    def replicas_agree(self) -> bool:
        return len(set(self.replica_terms.values())) <= 1

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "replicas_agree": self.replicas_agree}


def read_status(
    client: redis.Redis, settings: Settings, found: lag.Lag | None = None
) -> Status | None:
    """The status of the stream and its group; None if the stream does not exist. ``found``:
    the group's lag if the caller has just read it (it may count entries: not twice)."""
    s = settings
    if not client.exists(s.stream):
        return None
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    live = replicas.live(client, s.stream, replicas.live_window_ms(s.claim_idle_ms))
    if found is None:
        found = lag.group_lag(client, s.stream, s.group, repair=False)
    groups = {_text(g["name"]): g for g in client.xinfo_groups(s.stream)}
    consumers: list[Consumer] = []
    pending, oldest = 0, None
    if s.group in groups:
        pending = int(groups[s.group]["pending"])
        for c in client.xinfo_consumers(s.stream, s.group):
            name = _text(c["name"])
            consumers.append(Consumer(name, int(c["pending"]), int(c["idle"]), name in live))
        if pending:
            first = _text(client.xpending(s.stream, s.group)["min"])
            oldest = max(0, now_ms - int(first.split("-")[0]))
    return Status(
        stream=s.stream,
        group=s.group,
        length=int(client.xlen(s.stream)),
        lag=None if found is None else found.entries,
        lag_exact=found is not None and found.exact,
        lag_source="no group" if found is None else found.how,
        pending=pending,
        oldest_pending_age_ms=oldest,
        dead_letter_stream=s.dead_letter,
        dead_letter_length=int(client.xlen(s.dead_letter)),
        consumers=consumers,
        live_replicas=sorted(live),
        replica_terms={n: t for n, t in replicas.all_terms(client, s.stream).items() if n in live},
    )


def render(status: Status, console: Console) -> None:
    """A readable summary and a table of the consumers."""
    st = status
    if st.lag is None:
        shown_lag = f"no group {st.group!r}"
    else:
        shown_lag = f"{st.lag:,}" + ("" if st.lag_exact else "+ (at least; too many to count)")
    oldest = "-" if st.oldest_pending_age_ms is None else _duration(st.oldest_pending_age_ms)
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    for label, value in (
        ("stream", f"{st.stream} ({st.length:,} entries)"),
        ("group", st.group),
        ("lag", shown_lag),
        ("pending", f"{st.pending:,} (oldest {oldest})"),
        ("dead letters", f"{st.dead_letter_length:,} in {st.dead_letter_stream}"),
        ("live replicas", ", ".join(st.live_replicas) or "none"),
    ):
        summary.add_row(label, value)
    if not st.replicas_agree:
        shown = "; ".join(f"{n}: {t}" for n, t in sorted(st.replica_terms.items()))
        summary.add_row("[red]replicas disagree[/]", f"none applies until they agree: {shown}")
    console.print(summary)
    if st.consumers:
        table = Table(title="consumers", title_justify="left")
        table.add_column("name")
        table.add_column("pending", justify="right")
        table.add_column("idle", justify="right")
        table.add_column("replica")
        for c in st.consumers:
            table.add_row(c.name, f"{c.pending:,}", _duration(c.idle_ms), "live" if c.live else "-")
        console.print(table)


def _duration(ms: int) -> str:
    if ms < 1000:
        return f"{ms} ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    if ms < 7_200_000:
        return f"{ms / 60_000:.0f} min"
    return f"{ms / 3_600_000:.1f} h"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
