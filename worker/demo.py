"""``stream-counter demo``: the whole story in a minute, with nothing but Python.

A private server (worker/server.py), three replicas, events pushed with a progress bar, one
replica killed with SIGKILL half-way, the others claiming its entries, then every counter
next to its expected total. Nothing outlives the demo: the server and the replicas are in
a guarded process group (worker/server.py), killed with it even if the demo is SIGKILLed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

from config import ENV_PREFIX
from worker import lag
from worker.counters import read_values
from worker.errors import ExitCode
from worker.load import progress
from worker.producer import Fields, Producer, event
from worker.replicas import live, live_window_ms
from worker.server import Guard, NoServer, PrivateServer

STREAM, GROUP = "events", "stream-counter"
REPLICAS = 3
REPLICA_SETTINGS = {  # short times, so that the takeover shows within seconds
    "CLAIM_IDLE_MS": "2000",
    "LOCK_TTL_MS": "1000",
    "LOCK_WAIT_MS": "500",
    "BLOCK_MS": "200",
    "SHUTDOWN_GRACE_MS": "3000",
    "LOG_FORMAT": "json",
}


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


def run(events: int, counters: int, seed: int | None, console: Console) -> int:
    """The demo; exit 0 when every counter matches its expected total, 1 if not, 3 if no
    server can be started, 130 on Ctrl-C."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a stop, as Ctrl-C (even if started with
        signal.signal(sig, signal.default_int_handler)  # SIGINT ignored, as `cmd &` does)
    guard = Guard()
    try:
        server = PrivateServer(guard)
    except NoServer as exc:
        guard.close()
        print(f"stream-counter demo: {exc}", file=sys.stderr)
        return ExitCode.REDIS
    try:
        server.start()
        console.print(f"private server {server.binary.name} on {server.url}", highlight=False)
        return _show(server, guard, events, counters, random.Random(seed), console)
    except KeyboardInterrupt:
        console.print("interrupted: stopping the replicas and the server")
        return 130
    except (NoServer, RuntimeError, TimeoutError, redis.RedisError) as exc:
        print(f"stream-counter demo: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    finally:
        server.stop()
        guard.close()  # and whatever else is left, and the files


def _show(
    server: PrivateServer, guard: Guard, n: int, k: int, rng: random.Random, console: Console
) -> int:
    replicas: list[Replica] = []
    try:
        with redis.Redis.from_url(server.url) as client:
            expected: Counter[str] = Counter()
            events = _events(n, k, rng, expected)
            _push(client, events, n // 2, "backlog", console)  # waiting for the replicas
            replicas = [_start_replica(server, guard, i) for i in range(1, REPLICAS + 1)]
            _wait_ready(client, replicas, timeout=30)
            console.print(f"{REPLICAS} replicas: " + ", ".join(r.name for r in replicas))
            victim, deadline = replicas[1], time.monotonic() + 2
            while time.monotonic() < deadline and not _kill_if_holding(client, victim, console):
                time.sleep(0.002)  # until it is caught mid-batch on the backlog
            _push(client, events, n - n // 2, "the rest", console, victim=victim)
            _count(client, n, console, timeout=120)
            counted = read_values(client, sorted(expected))
        return _report(expected, counted, console)
    finally:
        for replica in replicas:
            if replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGTERM)
        for replica in replicas:
            try:
                replica.proc.wait(10)
            except subprocess.TimeoutExpired:
                replica.proc.kill()  # the guard would, too


def _push(
    client: redis.Redis,
    events: Iterator[Fields],
    count: int,
    what: str,
    console: Console,
    victim: Replica | None = None,
) -> None:
    """Push ``count`` of ``events``. With a ``victim``, kill it (SIGKILL) as soon as it holds
    entries it has read and not finished, as in a crash mid-batch."""
    with progress(console, always=True) as bar:
        task = bar.add_task(f"pushing {what}", total=count)
        for ids in Producer(client, STREAM).send_many(islice(events, count), chunk=500):
            bar.advance(task, len(ids))
            if victim is not None:
                _kill_if_holding(client, victim, bar.console)
    if victim is not None:
        _kill_if_holding(client, victim, console, anyway=True)


def _kill_if_holding(
    client: redis.Redis, victim: Replica, console: Console, anyway: bool = False
) -> bool:
    """Kill ``victim`` (SIGKILL) if it holds entries it has read and not finished, as in a
    crash mid-batch (or ``anyway``); whether it is dead now."""
    if victim.proc.poll() is not None:
        return True
    held = 0
    victim.proc.send_signal(signal.SIGSTOP)  # it cannot finish what it holds while we look
    try:
        held = _pending_of(client, victim.name)
    finally:
        if not held and not anyway:
            victim.proc.send_signal(signal.SIGCONT)
    if not held and not anyway:
        return False
    victim.proc.kill()
    victim.proc.wait()
    claim = REPLICA_SETTINGS["CLAIM_IDLE_MS"]
    entries = "entry" if held == 1 else "entries"
    console.print(f"killed {victim.name} (SIGKILL) holding {held} {entries} it had read;")
    console.print(f"the others claim them once idle for {claim} ms")
    return True


def _count(client: redis.Redis, n: int, console: Console, timeout: float) -> None:
    """Until every event pushed is counted and acknowledged, with a progress bar."""
    deadline = time.monotonic() + timeout
    with progress(console, always=True) as bar:
        task = bar.add_task("counting", total=n)
        while not bar.finished:
            found = lag.group_lag(client, STREAM, GROUP, repair=False)
            pending = client.xpending(STREAM, GROUP)["pending"]
            bar.update(task, completed=n - (found.entries if found else n) - pending)
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every event was counted within {timeout:.0f} s")
            time.sleep(0.1)


def _start_replica(server: PrivateServer, guard: Guard, i: int) -> Replica:
    name = f"demo-{i}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)},
        **{ENV_PREFIX + k: v for k, v in REPLICA_SETTINGS.items()},
        ENV_PREFIX + "REDIS_URL": server.url,
        ENV_PREFIX + "STREAM": STREAM,
        ENV_PREFIX + "CONSUMER": name,
    }
    log = server.workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = guard.popen(
            [sys.executable, "-m", "worker.cli", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Replica(name, proc, log)


def _wait_ready(client: redis.Redis, replicas: list[Replica], timeout: float) -> None:
    """Until every replica has said it is alive (its group is then in place)."""
    window = live_window_ms(int(REPLICA_SETTINGS["CLAIM_IDLE_MS"]))
    deadline = time.monotonic() + timeout
    while set(live(client, STREAM, window)) != {r.name for r in replicas}:
        for r in replicas:
            if r.proc.poll() is not None:
                tail = r.log.read_text(errors="replace")[-1000:]
                raise RuntimeError(f"replica {r.name} exited ({r.proc.returncode}): {tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replicas did not start within {timeout:.0f} s")
        time.sleep(0.05)


def _events(n: int, k: int, rng: random.Random, expected: Counter[str]) -> Iterator[Fields]:
    """``n`` events over ``k`` counters, some decrements; their totals kept in ``expected``."""
    for _ in range(n):
        name, amount, decr = f"demo:{rng.randrange(k)}", rng.randint(1, 9), rng.random() < 0.2
        expected[name] += -amount if decr else amount
        yield event(name, amount, decr=decr)


def _pending_of(client: redis.Redis, consumer: str) -> int:
    summary = client.xpending(STREAM, GROUP)  # per consumer, in one call
    return sum(int(c["pending"]) for c in summary["consumers"] if c["name"] == consumer.encode())


def _report(expected: Counter[str], counted: dict[str, int], console: Console) -> int:
    table = Table("counter", "expected", "counted", "", title="counters")
    for name in sorted(expected, key=lambda n: int(n.split(":")[1])):
        ok = counted[name] == expected[name]
        table.add_row(
            name, f"{expected[name]:,}", f"{counted[name]:,}", "✓" if ok else "[red]✗[/red]"
        )
    console.print(table)
    wrong = [n for n in expected if counted[n] != expected[n]]
    if wrong:
        console.print(f"[red]{len(wrong)} of {len(expected)} counters do not match[/red]")
        return ExitCode.FAILURE
    console.print(
        f"[green]all {len(expected)} counters match[/green], with one replica killed half-way"
    )
    return ExitCode.OK
