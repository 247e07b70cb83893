"""One measurement: consumer processes drain the same preloaded stream, timed from outside.

The clock starts when the group's ``entries-read`` first becomes > 0 and stops when it
equals N with nothing pending (XINFO GROUPS polled every 5 ms): the same yardstick for the
worker and every baseline, all of which run as processes of their own. Then every process
gets SIGTERM and must exit 0, and every counter is checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from bench import harness
from bench.harness import GROUP, STREAM, BenchFailure, Dataset, RedisServer

if TYPE_CHECKING:
    import psutil

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.005
RSS_EVERY_S = 0.5
STOP_TIMEOUT_S = 30


@dataclass(frozen=True)
class Command:
    label: str
    argv: list[str]
    env: dict[str, str]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def worker(
    server: RedisServer,
    consumer: str,
    *,
    level: str = "WARNING",
    batch: int = 1000,
    metrics: bool = False,
) -> Command:
    """``stream-counter run`` as users run it (the working tree's code, via PYTHONPATH);
    with ``metrics``, serving them on a free port (nobody scrapes: the cost is recording)."""
    extra = {"STREAM_COUNTER_METRICS_PORT": str(harness.free_port())} if metrics else {}
    env = _env(
        {
            **extra,
            "STREAM_COUNTER_REDIS_URL": server.url,
            "STREAM_COUNTER_STREAM": STREAM,
            "STREAM_COUNTER_GROUP": GROUP,
            "STREAM_COUNTER_CONSUMER": consumer,
            "STREAM_COUNTER_LOG_LEVEL": level,
            "STREAM_COUNTER_LOG_FORMAT": "json",
            "STREAM_COUNTER_BATCH_SIZE": str(batch),
        }
    )
    return Command(consumer, [sys.executable, "-m", "worker.cli", "run"], env)


def baseline(server: RedisServer, kind: str, consumer: str = "baseline") -> Command:
    argv = [sys.executable, "-m", "bench.baselines", kind, "--port", str(server.port)]
    return Command(consumer, [*argv, "--consumer", consumer], _env({}))


@dataclass
class ProcResult:
    label: str
    returncode: int
    lines: list[dict[str, Any]]
    """JSON log lines from stdout."""
    noise: list[str]
    """stderr lines, non-JSON stdout lines, and log lines at WARNING or above."""


@dataclass
class Measurement:
    events: int
    seconds: float
    procs: list[ProcResult]
    rss: list[tuple[float, float, int]] = field(default_factory=list)
    """(seconds since start, progress 0..1, RSS bytes) of the first process."""
    rss_idle: int = 0
    """RSS of the first process once it waits for work, before any event."""
    bookkeeping: list[str] = field(default_factory=list)
    other_keys: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


@dataclass
class _Running:
    command: Command
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path


def measure(
    server: RedisServer,
    r: redis.Redis,
    data: Dataset,
    n: int,
    commands: list[Command],
    who: str,
    *,
    sample_rss: bool = False,
) -> Measurement:
    """Preload n events, start ``commands``, time the drain, stop them, check every counter."""
    harness.preload(r, data, n)
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as logs:
        running: list[_Running] = []
        try:
            for i, c in enumerate(commands):
                out, err = Path(logs, f"{i}.out"), Path(logs, f"{i}.err")
                with out.open("wb") as fo, err.open("wb") as fe:
                    popen = subprocess.Popen(c.argv, env=c.env, cwd=ROOT, stdout=fo, stderr=fe)
                running.append(_Running(c, popen, out, err))
            _wait_ready(r, running, who)
            import psutil

            watched = psutil.Process(running[0].popen.pid) if sample_rss else None
            m = Measurement(n, 0.0, [])
            if watched is not None:
                m.rss_idle = watched.memory_info().rss
            harness.release(r, data, n)
            m.seconds = _drain(r, n, running, who, watched, m.rss)
            m.procs = _stop(running, who)
        except BaseException:
            for run in running:
                if run.popen.poll() is None:
                    run.popen.kill()
                    run.popen.wait()
            raise
    harness.check(r, data, n, who)
    m.bookkeeping = harness.bookkeeping_keys(r)
    m.other_keys = harness.other_keys(r)
    return m


def _tail(run: _Running, lines: int = 15) -> str:
    text = []
    for path in (run.out, run.err):
        content = path.read_text(errors="replace").splitlines() if path.exists() else []
        text += content[-lines:]
    return "\n    ".join(text) or "(no output)"


def _died(run: _Running, who: str, when: str) -> BenchFailure:
    return BenchFailure(
        f"{who}: process {run.command.label} exited with code {run.popen.returncode} "
        f"{when}; its last output:\n    {_tail(run)}"
    )


def _wait_ready(r: redis.Redis, running: list[_Running], who: str) -> None:
    deadline = time.monotonic() + 60
    while harness.blocked_readers(r) < len(running):
        for run in running:
            if run.popen.poll() is not None:
                raise _died(run, who, "before reading anything")
        if time.monotonic() > deadline:
            raise BenchFailure(f"{who}: consumers not waiting in XREADGROUP after 60 s")
        time.sleep(0.02)


def _drain(
    r: redis.Redis,
    n: int,
    running: list[_Running],
    who: str,
    watched: psutil.Process | None,
    rss: list[tuple[float, float, int]],
) -> float:
    timeout = 60 + n / 500
    began = time.perf_counter()
    start: float | None = None
    next_rss = 0.0
    while True:
        read, pending = harness.group_state(r)
        now = time.perf_counter()
        if start is None and read > 0:
            start = now
        done = read >= n and pending == 0
        if watched is not None and start is not None and (done or now >= next_rss):
            rss.append((now - start, (read - pending) / n, watched.memory_info().rss))
            next_rss = now + RSS_EVERY_S
        if done:
            assert start is not None
            return now - start
        for run in running:
            if run.popen.poll() is not None:
                raise _died(run, who, f"during the run (entries-read {read}/{n})")
        if now - began > timeout:
            raise BenchFailure(
                f"{who}: not drained after {timeout:.0f} s: entries-read {read}/{n}, "
                f"pending {pending}"
            )
        time.sleep(POLL_S)


def _stop(running: list[_Running], who: str) -> list[ProcResult]:
    for run in running:
        run.popen.send_signal(signal.SIGTERM)
    results = []
    for run in running:
        try:
            run.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            run.popen.kill()
            run.popen.wait()
            raise BenchFailure(
                f"{who}: {run.command.label} still running {STOP_TIMEOUT_S} s after SIGTERM"
            ) from None
        if run.popen.returncode != 0:
            raise _died(run, who, "after SIGTERM (want 0)")
        results.append(_parse(run))
    return results


def _parse(run: _Running) -> ProcResult:
    lines: list[dict[str, Any]] = []
    noise = run.err.read_text(errors="replace").splitlines()
    for raw in run.out.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            noise.append(raw)
            continue
        if not isinstance(line, dict):
            noise.append(raw)
            continue
        lines.append(line)
        if str(line.get("level", "")).lower() in ("warning", "error", "critical"):
            noise.append(raw)
    return ProcResult(run.command.label, run.popen.returncode, lines, noise)
