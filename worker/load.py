"""``stream-counter produce --file`` and ``--events``: many events, pipelined, with a
progress bar on a terminal.

A file holds JSON lines, one event each, with the contract's fields
(``{"counter": "page-views", "amount": 3}``). An invalid line is reported by its number and
skipped; the valid ones are still sent, and the command exits 1. Blank lines are skipped.
Generated events go round robin over ``load:0`` .. ``load:<K-1>``, +1 each, so that the
totals are known in advance: counter j gets N // K, plus one if j < N % K.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import BinaryIO

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker.errors import ExitCode, InvalidEvent
from worker.logs import scrub
from worker.producer import CHUNK, Fields, Producer, event, from_json


def progress(console: Console, *, always: bool = False) -> Progress:
    """A progress bar on ``console``: on a terminal only, unless ``always``."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not (always or console.is_terminal),
    )


def from_file(producer: Producer, path: str, console: Console) -> int:
    """Every valid line of ``path`` ('-': standard input) sent; exit 1 if a line was not,
    2 if the file cannot be read, 5 if Redis went away (saying what was sent)."""
    bad = 0
    unconfirmed: deque[int] = deque()  # line numbers of events sent, not yet confirmed

    def valid(lines: BinaryIO) -> Iterator[Fields]:
        nonlocal bad
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                fields = from_json(raw.decode("utf-8"))
            except (UnicodeDecodeError, InvalidEvent) as exc:
                bad += 1
                why = exc.reason if isinstance(exc, InvalidEvent) else "not UTF-8"
                console.print(
                    f"line {number}: {why}", markup=False, highlight=False, soft_wrap=True
                )
                continue
            unconfirmed.append(number)
            yield fields

    try:
        source = _open(path)
        total = _count_lines(path) if path != "-" and _regular(path) else None
    except OSError as exc:
        print(f"stream-counter: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.CONFIG
    sent, last = 0, 0
    with source as lines, progress(console) as bar:
        task = bar.add_task(f"sending to {producer.stream}", total=total)
        try:
            for ids in producer.send_many(valid(lines)):
                sent += len(ids)
                last = [unconfirmed.popleft() for _ in ids][-1]
                bar.update(task, completed=last)
        except redis.RedisError as exc:
            return _stopped(sent, f"every valid line up to line {last}", exc)
    print(f"sent {sent} events to {producer.stream}; {bad} invalid lines")
    return ExitCode.FAILURE if bad else ExitCode.OK


def _open(path: str) -> AbstractContextManager[BinaryIO]:
    if path != "-":
        return open(path, "rb")
    if sys.stdin is None:
        raise OSError("standard input is closed")
    return nullcontext(sys.stdin.buffer)


def _regular(path: str) -> bool:
    """A plain file can be read twice (to count its lines first); a pipe cannot."""
    return stat.S_ISREG(os.stat(path).st_mode)


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _stopped(sent: int, which: str, exc: redis.RedisError) -> int:
    """Redis failed mid-way: say what is known to be sent, and that the round trip in
    flight may be partly added (events with an ``event_id`` can be sent again safely)."""
    print(
        f"stream-counter: stopped after {sent} events confirmed ({which}); the next "
        f"{CHUNK} may be partly added: {scrub(str(exc))}",
        file=sys.stderr,
    )
    unreachable = isinstance(exc, redis.ConnectionError | redis.TimeoutError)
    return ExitCode.UNAVAILABLE if unreachable else ExitCode.FAILURE


def generated(producer: Producer, n: int, k: int, rate: float | None, console: Console) -> int:
    """``n`` events round robin over ``k`` counters, at most ``rate`` per second."""
    chunk = CHUNK if rate is None else max(1, min(CHUNK, int(rate / 10)))
    start = time.monotonic()
    sent = 0
    with progress(console) as bar:
        task = bar.add_task(f"sending to {producer.stream}", total=n)
        events = (event(f"load:{i % k}") for i in range(n))
        try:
            for ids in producer.send_many(events, chunk):
                sent += len(ids)
                bar.update(task, completed=sent)
                if rate is not None:  # the next chunk no earlier than this one's share of time
                    time.sleep(max(0.0, start + sent / rate - time.monotonic()))
        except redis.RedisError as exc:
            return _stopped(sent, f"load:0 .. load:{k - 1}, round robin from the first", exc)
    elapsed = time.monotonic() - start
    print(
        f"sent {sent} events to {producer.stream} over load:0 .. load:{k - 1} in "
        f"{elapsed:.2f} s ({sent / max(elapsed, 1e-9):,.0f} events/s)"
    )
    return ExitCode.OK
