"""``stream-counter produce --file`` and ``--events``: many events, pipelined, with a
progress bar on a terminal.

A file holds JSON lines, one event each, with the contract's fields
(``{"counter": "page-views", "amount": 3}``). An invalid line is reported by its number and
skipped; the valid ones are still sent, and the command exits 1. Blank lines are skipped.
Generated events go round robin over ``load:0`` .. ``load:<K-1>``, +1 each, so that the
totals are known in advance: counter j gets N // K, plus one if j < N % K.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import BinaryIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from worker.errors import ExitCode, InvalidEvent
from worker.producer import CHUNK, Fields, Producer, event, from_json


def _progress(console: Console, what: str, total: int | None) -> tuple[Progress, TaskID]:
    bar = Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    return bar, bar.add_task(what, total=total)


def from_file(sender: Producer, path: str, console: Console) -> int:
    """Every valid line of ``path`` ('-': standard input) sent; exit 1 if a line was not."""
    bad = 0
    sent = 0

    def valid(lines: BinaryIO) -> Iterator[Fields]:
        nonlocal bad
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                yield from_json(raw.decode("utf-8"))
            except UnicodeDecodeError:
                bad += 1
                console.print(f"line {number}: not UTF-8", markup=False, highlight=False)
            except InvalidEvent as exc:
                bad += 1
                console.print(f"line {number}: {exc.reason}", markup=False, highlight=False)

    total = None if path == "-" else _count_lines(path)
    source = nullcontext(sys.stdin.buffer) if path == "-" else open(path, "rb")  # noqa: SIM115
    bar, task = _progress(console, f"sending to {sender.stream}", total)
    with source as lines, bar:
        for ids in sender.send_many(valid(lines)):
            sent += len(ids)
            bar.update(task, completed=sent + bad)
    print(f"sent {sent} events to {sender.stream}; {bad} invalid lines")
    return ExitCode.FAILURE if bad else ExitCode.OK


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def generated(sender: Producer, n: int, k: int, rate: float | None, console: Console) -> int:
    """``n`` events round robin over ``k`` counters, at most ``rate`` per second."""
    chunk = CHUNK if rate is None else max(1, min(CHUNK, int(rate / 10)))
    start = time.monotonic()
    sent = 0
    bar, task = _progress(console, f"sending to {sender.stream}", n)
    with bar:
        events = (event(f"load:{i % k}") for i in range(n))
        for ids in sender.send_many(events, chunk):
            sent += len(ids)
            bar.update(task, completed=sent)
            if rate is not None:  # the next chunk no earlier than this one's share of time
                time.sleep(max(0.0, start + sent / rate - time.monotonic()))
    elapsed = time.monotonic() - start
    print(
        f"sent {sent} events to {sender.stream} over load:0 .. load:{k - 1} in {elapsed:.2f} s "
        f"({sent / max(elapsed, 1e-9):,.0f} events/s)"
    )
    return ExitCode.OK
