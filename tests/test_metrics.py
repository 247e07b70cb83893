"""Metrics, /healthz and /readyz (worker/metrics.py): what an operator scrapes is true."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis
from helpers import STREAM, MakeConsumer, drained, free_port, push, turn_until, wait_until

from worker import counters
from worker.errors import ExitCode
from worker.metrics import Metrics

ROOT = Path(__file__).parent.parent


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"stream_counter_{name}", labels)
    return 0.0 if value is None else value


def test_metrics_count_every_batch_and_read_the_group_from_redis(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    for i in range(250):
        push(r, f"c{i % 5}", 1)
    push(r, "c0", 1, event_id="once")
    push(r, "c0", 1, event_id="once")  # a producer retry: a duplicate
    r.xadd(STREAM, {"counter": "x", "amount": "zero"})  # invalid
    metrics = Metrics()
    consumer = make_consumer(metrics=metrics)
    turn_until(consumer, lambda: drained(r))
    assert sample(metrics, "events_applied_total") == 251
    assert sample(metrics, "duplicates_skipped_total") == 1
    assert sample(metrics, "dead_lettered_total", reason="invalid") == 1
    assert sample(metrics, "batch_duration_seconds_count") >= 1
    consumer.start_over()  # the gauges are read each reclaim interval: now
    consumer.turn()
    assert sample(metrics, "group_lag") == 0
    assert sample(metrics, "group_lag_exact") == 1
    assert sample(metrics, "pending") == 0
    assert sample(metrics, "dead_letter_length") == 1
    assert sample(metrics, "live_replicas") == 1


def test_entries_claimed_and_write_failures_are_counted(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    r.set("sc:{broken}:v", "not a number")
    push(r, "broken", 1)
    r.xgroup_create(STREAM, "stream-counter", id="0")
    r.xreadgroup("stream-counter", "dead", {STREAM: ">"}, count=10)
    metrics = Metrics()
    consumer = make_consumer(metrics=metrics, claim_idle_ms=1000, max_deliveries=2)
    wait_until(
        lambda: bool(consumer.turn() or sample(metrics, "entries_claimed_total")), 5, "a claim"
    )
    assert sample(metrics, "write_failures_total") >= 1
    turn_until(consumer, lambda: drained(r), turns=2000)
    assert sample(metrics, "dead_lettered_total", reason="max_deliveries") == 1


def test_a_counter_whose_lock_another_replica_holds_is_counted_busy_and_its_wait_timed(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    r.set(counters.lane_key("hot", "live"), "someone-else", px=10_000)
    push(r, "hot", 7)
    metrics = Metrics()
    consumer = make_consumer(metrics=metrics, lock_wait_ms=50)
    consumer.turn()
    assert sample(metrics, "lock_busy_total") >= 1
    assert sample(metrics, "lock_wait_seconds_count") >= 1
    assert sample(metrics, "lock_wait_seconds_sum") > 0
    assert sample(metrics, "events_applied_total") == 0
    r.delete(counters.lane_key("hot", "live"))
    turn_until(consumer, lambda: drained(r))
    assert sample(metrics, "events_applied_total") == 1
    assert sample(metrics, "lock_lost_total") == 0  # busy is not lost: nothing was refused


def test_http_serves_metrics_health_and_readiness_and_never_the_password(
    own_redis: Any, spawn_worker: Any
) -> None:
    r = own_redis.client()
    r.config_set("requirepass", "pw-metrics-7")
    r = own_redis.client(password="pw-metrics-7")
    push(r, "a", 1)
    port = free_port()
    url = f"redis://:pw-metrics-7@127.0.0.1:{own_redis.port}/0"
    worker = spawn_worker(url, metrics_port=port, block_ms=100)
    wait_until(lambda: get(port, "/readyz")[0] == 200, 10, "the worker to be ready")
    wait_until(lambda: drained(r), 10, "the group to drain")
    status, body = get(port, "/metrics")
    assert status == 200
    assert "stream_counter_events_applied_total 1.0" in body
    assert get(port, "/healthz")[0] == 200
    own_redis.kill()  # Redis gone: not ready, yet alive (a restart would not help)
    wait_until(lambda: get(port, "/readyz")[0] == 503, 10, "not ready")
    assert get(port, "/healthz")[0] == 200
    own_redis.start()
    own_redis.client().config_set("requirepass", "pw-metrics-7")
    wait_until(lambda: get(port, "/readyz")[0] == 200, 15, "ready again")
    assert "stream_counter_redis_reconnects_total 1.0" in get(port, "/metrics")[1]
    everything = "".join(get(port, p)[1] for p in ("/metrics", "/healthz", "/readyz"))
    assert "pw-metrics-7" not in everything + worker.log()


def test_a_metrics_port_in_use_stops_the_worker_at_start_with_one_line(
    redis_server: Any, spawn_worker: Any
) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = spawn_worker(redis_server.url, metrics_port=port)
        assert worker.wait(20) == ExitCode.CONFIG
    (line,) = [json.loads(x) for x in worker.log().splitlines() if "cannot serve" in x]
    assert line["port"] == port


def test_every_query_of_the_grafana_dashboard_names_a_metric_the_worker_exports() -> None:
    exported = exported_names(Metrics())
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert queries
    for query in queries:
        names = set(re.findall(r"\bstream_counter_[a-z_]+", query))
        assert names, query
        assert names <= exported, (query, names - exported)


def test_the_readme_lists_every_metric_the_worker_exports() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(stream_counter_[a-z_]+)`", readme))
    families = {m.name for m in Metrics().registry.collect()}
    assert families <= {re.sub(r"_total$", "", name) for name in documented} | documented


def exported_names(metrics: Metrics) -> set[str]:
    return {s.name for family in metrics.registry.collect() for s in family.samples} | {
        family.name for family in metrics.registry.collect()
    }
