"""stream-counter benchmark: the worker against its baselines, side by side, on the same data.

    python -m bench.run                # full run (about 10 minutes on 2 cores)
    python -m bench.run --quick        # smoke run (1-2 minutes)

Starts its own redis-server on a free loopback port. For every measurement: FLUSHALL,
preload the same events (seeded), consume them all, check EVERY counter (a fast wrong
consumer is not fast: the run stops with an error), repeat, report medians. Consumers:

  worker            ``stream-counter run`` (a process, as users run it), batch size 1000
  worker + metrics  the same with Prometheus metrics on (their cost: the ratio to worker)
  worker x2         two such processes on the same group
  ceiling           batched pipeline, INCRBY per message, one XACK per batch; no lock, no
                    exactly-once (a ceiling, not a worker)
  ceiling (summed)  the same with one INCRBY per counter and batch (informational)
  plain             INCRBY + XACK per message
  naive             the seed's algorithm: SET NX EX lock polled every 0.1 s, GET/SET, DEL,
                    XACK per message

on three counter sets (1 hot counter, 100, 100,000), then a lock-contention run (4 replicas
vs 1 on one hot counter) and a memory soak (worker RSS over 1,000,000 events, and the
exactly-once bookkeeping left in Redis after the drain). Writes results.md, results.json,
throughput.png (and soak_rss.png) to --out; prints the Markdown to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, report
from bench.harness import BenchFailure, Dataset, RedisServer
from bench.measure import Command, Measurement

Builder = Callable[[RedisServer], list[Command]]

CONSUMERS: dict[str, tuple[str, Builder, bool]] = {
    # name: (description, commands, runs on the baseline event count)
    "worker": (
        "`stream-counter run`, 1 process, batch 1000, every guarantee on",
        lambda s: [measure.worker(s, "bench-w1")],
        False,
    ),
    "worker + metrics": (
        "as worker, with `STREAM_COUNTER_METRICS_PORT` set (Prometheus metrics recorded)",
        lambda s: [measure.worker(s, "bench-w1", metrics=True)],
        False,
    ),
    "worker x2": (
        "2 `stream-counter run` processes, same group",
        lambda s: [measure.worker(s, "bench-w1"), measure.worker(s, "bench-w2")],
        False,
    ),
    "ceiling": (
        "batched pipeline: XREADGROUP 1000, INCRBY per message, one XACK; no lock, no exactly-once",
        lambda s: [measure.baseline(s, "ceiling")],
        False,
    ),
    "ceiling (summed)": (
        "as ceiling, one INCRBY per counter per batch (informational)",
        lambda s: [measure.baseline(s, "ceiling-summed")],
        False,
    ),
    "plain": (
        "INCRBY + XACK per message, a round trip each",
        lambda s: [measure.baseline(s, "plain")],
        True,
    ),
    "naive": (
        "the seed: SET NX EX 5 lock polled every 0.1 s, GET, SET, DEL, XACK per message",
        lambda s: [measure.baseline(s, "naive")],
        True,
    ),
}
WORKERS = ("worker", "worker x2")
BASELINES = ("ceiling", "ceiling (summed)", "plain", "naive")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "runs": [round(v, 1) for v in values],
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


class Bench:
    def __init__(self, args: argparse.Namespace, server: RedisServer) -> None:
        self.args = args
        self.server = server
        self.r = server.client()
        self.worker_runs = 0
        self.checked_runs = 0
        self.leaks: list[str] = []
        self.noise: dict[str, list[str]] = {}

    def run(self, data: Dataset, n: int, commands: list[Command], who: str, **kw: Any) -> Any:
        m: Measurement = measure.measure(self.server, self.r, data, n, commands, who, **kw)
        self.checked_runs += 1
        if any(c.argv[-2:] == ["worker.cli", "run"] for c in commands):
            self.worker_runs += 1
            self.leaks += [f"{who}: {k}" for k in m.bookkeeping]
            for p in m.procs:
                if p.noise:
                    self.noise.setdefault(who, []).extend(p.noise[:5])
        return m

    def throughput(self, size: int) -> dict[str, Any]:
        a = self.args
        data = Dataset(size, a.events, a.seed)
        small = min(a.events, a.baseline_events)
        rates: dict[str, list[float]] = {name: [] for name in a.consumers}
        for rep in range(1, a.repeat + 1):
            for name in a.consumers:
                _desc, build, is_slow = CONSUMERS[name]
                n = small if is_slow else a.events
                who = f"{name} [{data.label}, run {rep}/{a.repeat}]"
                m = self.run(data, n, build(self.server), who)
                rates[name].append(m.rate)
                log(f"{who}: {n:,} events in {m.seconds:.2f} s = {m.rate:,.0f} events/s, ok")
        out: dict[str, Any] = {}
        for name, values in rates.items():
            is_slow = CONSUMERS[name][2]
            out[name] = {"events": small if is_slow else a.events, **summary(values)}
        return out

    def contention(self) -> dict[str, Any]:
        a = self.args
        data = Dataset(1, a.contention_events, a.seed)
        n = a.contention_events
        result: dict[str, Any] = {"events": n, "replicas": {}}
        for replicas in (1, a.contention_replicas):
            runs = []
            for rep in range(1, a.repeat + 1):
                names = [f"bench-c{i}" for i in range(1, replicas + 1)]
                commands = [measure.worker(self.server, c, level="DEBUG") for c in names]
                who = f"contention: {replicas} replica(s) on 1 hot counter [run {rep}/{a.repeat}]"
                m = self.run(data, n, commands, who)
                runs.append(self._contention_run(m, who))
                shares = ", ".join(f"{s:.0%}" for s in runs[-1]["shares"])
                log(f"{who}: {m.rate:,.0f} events/s, shares {shares}, ok")
            result["replicas"][str(replicas)] = self._contention_summary(runs)
        return result

    def _contention_run(self, m: Measurement, who: str) -> dict[str, Any]:
        stopped, waits, batch_ms, lock_field, max_wait = [], [], [], False, []
        for p in m.procs:
            own = [float(x.get("lock_wait_ms", 0)) for x in p.lines if x.get("event") == "batch"]
            max_wait.append(round(max(own, default=0.0), 1))
            final = [x for x in p.lines if x.get("event") == "stopped"]
            if not final:
                raise BenchFailure(f"{who}: {p.label} logged no 'stopped' line")
            stopped.append(final[-1])
            for line in p.lines:
                if line.get("event") != "batch":
                    continue
                if "ms" in line:
                    batch_ms.append(float(line["ms"]))
                if "lock_wait_ms" in line:
                    lock_field = True
                    waits.append(float(line["lock_wait_ms"]))
        applied = [int(s.get("applied", 0)) for s in stopped]
        duplicates = sum(int(s.get("duplicates", 0)) for s in stopped)
        if sum(applied) + duplicates != m.events:
            raise BenchFailure(
                f"{who}: replicas report applied {sum(applied)} + duplicates {duplicates} "
                f"!= {m.events} events"
            )
        total = sum(applied) or 1
        return {
            "rate": m.rate,
            "applied": applied,
            "shares": [x / total for x in applied],
            "lock_busy": [int(s.get("lock_busy", 0)) for s in stopped],
            "lock_lost": [int(s.get("lock_lost", 0)) for s in stopped],
            "max_lock_wait_ms": max_wait,
            "duplicates": duplicates,
            "batch_ms": batch_ms,
            "lock_wait_ms": waits if lock_field else None,
        }

    @staticmethod
    def _contention_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        has_field = all(r["lock_wait_ms"] is not None for r in runs)
        batch_ms = [v for r in runs for v in r["batch_ms"]]
        waits = [v for r in runs for v in r["lock_wait_ms"]] if has_field else batch_ms
        return {
            **summary([r["rate"] for r in runs]),
            "per_run": [
                {k: v for k, v in r.items() if k not in ("batch_ms", "lock_wait_ms")} for r in runs
            ],
            "min_share": min(min(r["shares"]) for r in runs),
            "wait_source": "lock_wait_ms" if has_field else "batch ms",
            "wait_ms": percentiles(waits),
            "batch_ms": percentiles(batch_ms),
            "batches": len(batch_ms),
        }

    def soak(self) -> dict[str, Any]:
        n = self.args.soak_events
        data = Dataset(100, n, self.args.seed)
        log(f"soak: preloading {n:,} events (100 counters)")
        command = [measure.worker(self.server, "bench-soak")]
        m = self.run(data, n, command, f"soak [{n:,} events]", sample_rss=True)
        log(f"soak: {m.rate:,.0f} events/s, ok")

        def at(progress: float) -> int:
            return next(rss for _, p, rss in m.rss if p >= progress)

        return {
            "events": n,
            "rate": m.rate,
            "rss_idle": m.rss_idle,
            "rss": {"10%": at(0.1), "50%": at(0.5), "100%": m.rss[-1][2]},
            "rss_max": max(rss for _, _, rss in m.rss),
            "samples": [[round(t, 2), round(p, 4), rss] for t, p, rss in m.rss],
            "bookkeeping_keys": m.bookkeeping,
            "other_keys": m.other_keys,
        }


def environment(server: RedisServer) -> dict[str, Any]:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=measure.ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    dirty = git("status", "--porcelain", "--", "worker", "config")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git("rev-parse", "--short", "HEAD")
        + (" + uncommitted worker changes" * bool(dirty)),
        "python": platform.python_version(),
        "redis": server.version(),
        "cpus": len(os.sched_getaffinity(0)),
        "machine": f"{platform.system()} {platform.machine()}",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, help="events per measurement (default 200000)")
    p.add_argument("--repeat", type=int, help="runs per measurement (default 3)")
    p.add_argument("--sets", default="1,100,100000", help="counter sets (default 1,100,100000)")
    p.add_argument(
        "--baseline-events",
        type=int,
        help="plain and naive are slow: they run min(events, this) (default 20000)",
    )
    p.add_argument("--contention-events", type=int, help="(default: --events)")
    p.add_argument("--contention-replicas", type=int, default=4)
    p.add_argument("--soak-events", type=int, help="memory soak size (default 1000000)")
    p.add_argument("--no-soak", action="store_true", help="skip the memory soak")
    p.add_argument("--no-contention", action="store_true", help="skip the contention run")
    p.add_argument(
        "--consumers",
        default=",".join(CONSUMERS),
        help=f"subset of: {', '.join(CONSUMERS)} (must include worker)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small smoke run (about 1-2 minutes)")
    p.add_argument("--out", default="bench/results", help="output directory")
    p.add_argument("--strict", action="store_true", help="exit 3 if a target check fails")
    a = p.parse_args(argv)
    quick = {"events": 50_000, "repeat": 1, "baseline_events": 5_000, "soak_events": 200_000}
    full = {"events": 200_000, "repeat": 3, "baseline_events": 20_000, "soak_events": 1_000_000}
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.contention_events = a.contention_events or a.events
    a.sets = [int(x) for x in a.sets.split(",") if x.strip()]
    a.consumers = [c.strip() for c in a.consumers.split(",") if c.strip()]
    unknown = [c for c in a.consumers if c not in CONSUMERS]
    if unknown or "worker" not in a.consumers:
        p.error(f"--consumers: unknown {unknown} or no 'worker'")
    if min(a.events, a.baseline_events, a.soak_events, a.contention_events) < 2:
        p.error("event counts must be >= 2")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import psutil  # noqa: F401
    except ImportError:
        print("bench: needs matplotlib and psutil: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    server = RedisServer().start()
    log(f"redis-server {server.version()} on 127.0.0.1:{server.port}")
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": environment(server),
        "consumers": {name: CONSUMERS[name][0] for name in args.consumers},
        "throughput": {},
    }
    bench = Bench(args, server)
    try:
        for size in args.sets:
            results["throughput"][str(size)] = bench.throughput(size)
        if not args.no_contention:
            results["contention"] = bench.contention()
        if not args.no_soak:
            results["soak"] = bench.soak()
    except BenchFailure as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    results["correctness"] = {
        "checked_runs": bench.checked_runs,
        "worker_runs": bench.worker_runs,
        "bookkeeping_left": bench.leaks,
        "worker_noise": bench.noise,
    }
    results["seconds"] = round(time.monotonic() - began, 1)
    results["checks"] = report.checks(results)
    markdown = report.markdown(results)
    (out / "results.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    charts = report.charts(results, out)
    print(markdown)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'}, {', '.join(map(str, charts))}")
    failed = [c["check"] for c in results["checks"] if c["verdict"] == "FAIL"]
    if failed:
        log(f"target checks failed: {'; '.join(failed)}")
    return 3 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
